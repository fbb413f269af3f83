/* MoFO CPU kernels: float32, contiguous, one pass each, no allocation.
 *
 * Every entry point works on a list of T tensors seen as one index space [0, sum n) and
 * processes the slice [start, end) of it, so Python can split the work over threads (ctypes
 * drops the GIL while C runs). Keys are compared as the bit patterns of non-negative float32
 * values, whose integer order is their numeric order, so thresholds and histogram bins are
 * exact integers and the counts always agree with the final selection.
 *
 * Key modes: 0 = |momentum| (after this step's update), 1 = |gradient|, 2 = seeded uniform hash.
 * Arithmetic follows torch.optim.AdamW's single-tensor CPU ops in order (lerp as fma,
 * addcmul, sqrt / bc2 + eps, addcdiv); build with -ffp-contract=off to keep it that way.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 512

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline uint32_t abs_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffU;
}

static inline uint32_t hash_bits(int64_t i, uint32_t seed) {
    float key = (float)(mix32((uint32_t)i + seed) >> 8) * (1.0f / 16777216.0f);
    return abs_bits(key);
}

static inline float lerp(float start, float end, float weight) {
    return weight < 0.5f ? fmaf(weight, end - start, start)
                         : fmaf(weight - 1.0f, end - start, end);
}

/* Histogram of keys into counts[0..nbins): bin j holds lo + j*2^shift <= key < lo + (j+1)*2^shift;
 * counts[nbins] counts keys >= lo + nbins*2^shift. Keys below lo are not counted. Keys are below
 * 2^31, so offsets key - lo fit in int32 and compare as uint32 (negative ones become huge). */
static void histogram(const uint32_t *keys, int len, uint32_t lo, int shift, int nbins,
                      int64_t *counts) {
    const uint64_t span64 = (uint64_t)nbins << shift;
    const uint32_t span = (uint32_t)span64; /* <= 2^31 */
    const uint32_t hi = lo + span64 >= 0x80000000u ? 0x80000000u : (uint32_t)(lo + span64);
    int64_t above = 0;
#if defined(__AVX512F__)
    /* The few keys inside the bracket are compacted first (register-form compress: the memory
     * form is microcoded on AMD), so the scalar scatter only runs for them. */
    uint32_t inside[BLOCK + 16];
    int count = 0;
    const __m512i vlo = _mm512_set1_epi32((int)lo), vspan = _mm512_set1_epi32((int)span);
    const __m512i vhi = _mm512_set1_epi32((int)hi);
    for (int j = 0; j < len; j += 16) {
        __mmask16 live = len - j >= 16 ? 0xFFFF : (__mmask16)((1u << (len - j)) - 1);
        __m512i key = _mm512_maskz_loadu_epi32(live, keys + j);
        __m512i offset = _mm512_sub_epi32(key, vlo);
        __mmask16 in = _mm512_mask_cmplt_epu32_mask(live, offset, vspan);
        above += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(live, key, vhi));
        if (in) {
            _mm512_storeu_si512(inside + count, _mm512_maskz_compress_epi32(in, offset));
            count += __builtin_popcount(in);
        }
    }
    for (int j = 0; j < count; j++) counts[inside[j] >> shift]++;
#else
    for (int j = 0; j < len; j++) {
        uint32_t offset = keys[j] - lo;
        above += keys[j] >= hi;
        if (offset < span) counts[offset >> shift]++;
    }
#endif
    counts[nbins] += above;
}

static void key_block(int mode, const float *m, const float *g, int64_t first, int len,
                      uint32_t seed, uint32_t *keys) {
    if (mode == 0) {
        for (int j = 0; j < len; j++) keys[j] = abs_bits(m[j]);
    } else if (mode == 1) {
        for (int j = 0; j < len; j++) keys[j] = abs_bits(g[j]);
    } else {
        for (int j = 0; j < len; j++) keys[j] = hash_bits(first + j, seed);
    }
}

#if defined(__AVX512F__)
/* AVX-512 versions of the momentum/gradient-key passes, one fused loop each: the moments and
 * the key histogram in one sweep; the masked step only does its arithmetic (and only reads v)
 * for 16-lane vectors holding at least one moving coordinate. */
#define FLUSH 1024

/* Histogram state kept in locals (registers): through a pointer, the compiler would reload
 * and store it around every compacting store, a serial chain through memory. */
#define COUNTER_VARS                                                                  \
    __m512i c_lo = _mm512_setzero_si512(), c_span = c_lo, c_hi = c_lo, c_above = c_lo; \
    uint32_t c_inside[FLUSH + 16];                                                    \
    int c_fill = 0

#define COUNTER_INIT(lo, shift, nbins)                                                  \
    do {                                                                                \
        uint64_t span64_ = (uint64_t)(nbins) << (shift);                                \
        uint64_t hi_ = (lo) + span64_ >= 0x80000000u ? 0x80000000u : (lo) + span64_;   \
        c_lo = _mm512_set1_epi32((int)(lo));                                            \
        c_span = _mm512_set1_epi32((int)(uint32_t)span64_);                             \
        c_hi = _mm512_set1_epi32((int)(uint32_t)hi_);                                   \
    } while (0)

#define COUNTER_ADD(values, live, counts, shift)                                            \
    do {                                                                                    \
        __m512i key_ = _mm512_and_si512(_mm512_castps_si512(values),                        \
                                        _mm512_set1_epi32(0x7fffffff));                     \
        __m512i offset_ = _mm512_sub_epi32(key_, c_lo);                                     \
        __mmask16 in_ = _mm512_mask_cmplt_epu32_mask(live, offset_, c_span);                \
        __mmask16 high_ = _mm512_mask_cmpge_epu32_mask(live, key_, c_hi);                   \
        c_above = _mm512_mask_sub_epi32(c_above, high_, c_above, _mm512_set1_epi32(-1));    \
        _mm512_storeu_si512(c_inside + c_fill, _mm512_maskz_compress_epi32(in_, offset_));  \
        c_fill += __builtin_popcount(in_);                                                  \
        if (c_fill >= FLUSH) {                                                              \
            for (int j_ = 0; j_ < c_fill; j_++) (counts)[c_inside[j_] >> (shift)]++;        \
            c_fill = 0;                                                                     \
        }                                                                                   \
    } while (0)

#define COUNTER_DONE(counts, shift, nbins)                                          \
    do {                                                                            \
        for (int j_ = 0; j_ < c_fill; j_++) (counts)[c_inside[j_] >> (shift)]++;    \
        (counts)[nbins] += _mm512_reduce_add_epi32(c_above);                        \
    } while (0)

static inline __mmask16 live_mask(int64_t i, int64_t b) {
    return b - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (b - i)) - 1);
}

static void moments_avx512(const float *g, float *m, float *v, int64_t a, int64_t b,
                           float weight1, float beta2, float weight2, int key_from_grad,
                           uint32_t lo, int shift, int nbins, int64_t *counts) {
    const int small = weight1 < 0.5f;
    const __m512 w = _mm512_set1_ps(small ? weight1 : weight1 - 1.0f);
    const __m512 vb2 = _mm512_set1_ps(beta2), vw2 = _mm512_set1_ps(weight2);
    COUNTER_VARS;
    if (counts) COUNTER_INIT(lo, shift, nbins);
    for (int64_t i = a; i < b; i += 16) {
        __mmask16 live = live_mask(i, b);
        __m512 gi = _mm512_maskz_loadu_ps(live, g + i), mi = _mm512_maskz_loadu_ps(live, m + i);
        __m512 vi = _mm512_maskz_loadu_ps(live, v + i);
        __m512 diff = _mm512_sub_ps(gi, mi);
        mi = _mm512_fmadd_ps(w, diff, small ? mi : gi);
        vi = _mm512_add_ps(_mm512_mul_ps(vi, vb2), _mm512_mul_ps(_mm512_mul_ps(vw2, gi), gi));
        _mm512_mask_storeu_ps(m + i, live, mi);
        _mm512_mask_storeu_ps(v + i, live, vi);
        if (counts) COUNTER_ADD(key_from_grad ? gi : mi, live, counts, shift);
    }
    if (counts) COUNTER_DONE(counts, shift, nbins);
}

static void count_avx512(const float *src, int64_t a, int64_t b, uint32_t lo, int shift,
                         int nbins, int64_t *counts) {
    COUNTER_VARS;
    COUNTER_INIT(lo, shift, nbins);
    for (int64_t i = a; i < b; i += 16) {
        __mmask16 live = live_mask(i, b);
        COUNTER_ADD(_mm512_maskz_loadu_ps(live, src + i), live, counts, shift);
    }
    COUNTER_DONE(counts, shift, nbins);
}

static int64_t update_avx512(float *p, const float *m, const float *v, const float *g, int64_t a,
                             int64_t b, int key_from_grad, uint32_t threshold, float decay,
                             float neg_step, float bc2, float eps, int decay_all) {
    const __m512i thr = _mm512_set1_epi32((int)threshold), abs = _mm512_set1_epi32(0x7fffffff);
    const __m512 vdecay = _mm512_set1_ps(decay), vstep = _mm512_set1_ps(neg_step);
    const __m512 vbc2 = _mm512_set1_ps(bc2), veps = _mm512_set1_ps(eps);
    int64_t moved = 0;
    for (int64_t i = a; i < b; i += 16) {
        __mmask16 live = live_mask(i, b);
        __m512 mi = _mm512_maskz_loadu_ps(live, m + i);
        __m512 src = key_from_grad ? _mm512_maskz_loadu_ps(live, g + i) : mi;
        __m512i key = _mm512_and_si512(_mm512_castps_si512(src), abs);
        __mmask16 take = _mm512_mask_cmpge_epu32_mask(live, key, thr);
        if (!take) {
            if (decay_all)
                _mm512_mask_storeu_ps(p + i, live,
                                      _mm512_mul_ps(_mm512_maskz_loadu_ps(live, p + i), vdecay));
            continue;
        }
        moved += __builtin_popcount(take);
        __m512 pi = _mm512_maskz_loadu_ps(live, p + i), vi = _mm512_maskz_loadu_ps(take, v + i);
        __m512 decayed = _mm512_mul_ps(pi, vdecay);
        __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), vbc2), veps);
        __m512 stepped = _mm512_add_ps(decayed, _mm512_div_ps(_mm512_mul_ps(vstep, mi), denom));
        if (decay_all) _mm512_mask_storeu_ps(p + i, live, _mm512_mask_blend_ps(take, decayed, stepped));
        else _mm512_mask_storeu_ps(p + i, take, stepped);
    }
    return moved;
}
#endif

/* Walk the tensors overlapping [start, end): calls body(t, a, b) for local ranges [a, b). */
#define FOR_SLICES(T, numels, start, end, ...)                                    \
    do {                                                                           \
        int64_t base_ = 0;                                                         \
        for (int t = 0; t < (T) && base_ < (end); base_ += (numels)[t], t++) {    \
            int64_t a = (start) > base_ ? (start) - base_ : 0;                     \
            int64_t b = (end) - base_ < (numels)[t] ? (end) - base_ : (numels)[t]; \
            if (a < b) __VA_ARGS__                                                 \
        }                                                                          \
    } while (0)

/* Adam moments for every tensor; for tensors with shift >= 0 also the key histogram.
 * counts is this thread's [T, nbins + 1] buffer. */
void mofo_moments(int T, const int64_t *numels, float *const *grads, float *const *exp_avgs,
                  float *const *exp_avg_sqs, float weight1, float beta2, float weight2,
                  int mode, const uint32_t *seeds, const uint32_t *los, const int32_t *shifts,
                  int nbins, int64_t start, int64_t end, int64_t *counts) {
    uint32_t keys[BLOCK];
    FOR_SLICES(T, numels, start, end, {
        const float *g = grads[t];
        float *m = exp_avgs[t], *v = exp_avg_sqs[t];
#if defined(__AVX512F__)
        if (mode != 2) {
            int64_t *row = shifts[t] >= 0 ? counts + (int64_t)t * (nbins + 1) : NULL;
            moments_avx512(g, m, v, a, b, weight1, beta2, weight2, mode == 1, los[t], shifts[t],
                           nbins, row);
            continue;
        }
#endif
        for (int64_t s = a; s < b; s += BLOCK) {
            int len = (int)(b - s < BLOCK ? b - s : BLOCK);
            for (int j = 0; j < len; j++) {
                float gj = g[s + j];
                m[s + j] = lerp(m[s + j], gj, weight1);
                v[s + j] = v[s + j] * beta2 + weight2 * gj * gj;
            }
            if (shifts[t] >= 0) {
                key_block(mode, m + s, g + s, s, len, seeds[t], keys);
                histogram(keys, len, los[t], shifts[t], nbins, counts + (int64_t)t * (nbins + 1));
            }
        }
    });
}

/* Key histogram only (a refinement pass over already updated moments). */
void mofo_count(int T, const int64_t *numels, float *const *grads, float *const *exp_avgs,
                int mode, const uint32_t *seeds, const uint32_t *los, const int32_t *shifts,
                int nbins, int64_t start, int64_t end, int64_t *counts) {
    uint32_t keys[BLOCK];
    FOR_SLICES(T, numels, start, end, {
#if defined(__AVX512F__)
        if (mode != 2) {
            count_avx512(mode == 1 ? grads[t] : exp_avgs[t], a, b, los[t], shifts[t], nbins,
                         counts + (int64_t)t * (nbins + 1));
            continue;
        }
#endif
        for (int64_t s = a; s < b; s += BLOCK) {
            int len = (int)(b - s < BLOCK ? b - s : BLOCK);
            key_block(mode, exp_avgs[t] + s, grads[t] + s, s, len, seeds[t], keys);
            histogram(keys, len, los[t], shifts[t], nbins, counts + (int64_t)t * (nbins + 1));
        }
    });
}

/* Adam step on coordinates whose key >= thresholds[t]; weight decay on those only, or on all
 * coordinates if decay_all. moved[t] receives the number of coordinates that took the step. */
void mofo_update(int T, const int64_t *numels, float *const *params, float *const *grads,
                 float *const *exp_avgs, float *const *exp_avg_sqs, int mode,
                 const uint32_t *seeds, const uint32_t *thresholds, const float *decays,
                 const float *neg_step_sizes, const float *bias2_sqrts, float eps, int decay_all,
                 int64_t start, int64_t end, int64_t *moved) {
    uint32_t keys[BLOCK];
    FOR_SLICES(T, numels, start, end, {
        float *p = params[t];
        const float *m = exp_avgs[t], *v = exp_avg_sqs[t];
        const float decay = decays[t], neg_step = neg_step_sizes[t], bc2 = bias2_sqrts[t];
        const uint32_t threshold = thresholds[t];
        int64_t count = 0;
#if defined(__AVX512F__)
        if (mode != 2) {
            moved[t] += update_avx512(p, m, v, grads[t], a, b, mode == 1, threshold, decay,
                                      neg_step, bc2, eps, decay_all);
            continue;
        }
#endif
        for (int64_t s = a; s < b; s += BLOCK) {
            int len = (int)(b - s < BLOCK ? b - s : BLOCK);
            if (threshold == 0) {
                for (int j = 0; j < len; j++) keys[j] = 0;
            } else {
                key_block(mode, m + s, grads[t] + s, s, len, seeds[t], keys);
            }
            for (int j = 0; j < len; j++) {
                int64_t i = s + j;
                float kept = p[i];
                float decayed = kept * decay;
                float denom = sqrtf(v[i]) / bc2 + eps;
                float stepped = decayed + neg_step * m[i] / denom;
                int take = keys[j] >= threshold;
                count += take;
                p[i] = take ? stepped : (decay_all ? decayed : kept);
            }
        }
        moved[t] += count;
    });
}

/* k-th largest (1-based) of keys[0..n), reordering keys: quickselect. */
static uint32_t kth_largest(uint32_t *keys, int n, int k) {
    int left = 0, right = n - 1, want = k - 1;
    while (left < right) {
        uint32_t pivot = keys[left + (right - left) / 2];
        int i = left, j = right;
        while (i <= j) {
            while (keys[i] > pivot) i++;
            while (keys[j] < pivot) j--;
            if (i <= j) {
                uint32_t tmp = keys[i];
                keys[i++] = keys[j];
                keys[j--] = tmp;
            }
        }
        if (want <= j) right = j;
        else if (want >= i) left = i;
        else return keys[want];
    }
    return keys[want];
}

/* Per tensor in [first, last): a bracket [lo, hi) of key bit patterns that likely holds the
 * k-th largest key of this step, from `per_tensor` keys sampled in runs of `run` neighbours
 * (one or two cache misses per run). Mirrors select.sample_bracket: the sampled quantile at
 * share = k / n, +- z standard errors (z already includes the design effect of runs), +- 2. */
void mofo_bracket(int first, int last, const int64_t *numels, float *const *grads,
                  float *const *exp_avgs, float weight1, int mode, const uint32_t *seeds,
                  int per_tensor, int run, const double *shares, double z, int64_t *los,
                  int64_t *his) {
    uint32_t keys[8192];
    if (per_tensor > 8192) per_tensor = 8192;
    for (int t = first; t < last; t++) {
        int64_t n = numels[t];
        const float *g = grads[t], *m = exp_avgs[t];
        int runs = per_tensor / run, size = 0;
        for (int r = 0; r < runs; r++) {
            int64_t start = (int64_t)r * run;
            if (n > per_tensor) {
                int64_t stride = n / runs;
                start = r * stride + mix32((uint32_t)r ^ seeds[t]) % (uint32_t)(stride - run + 1);
            }
            for (int j = 0; j < run; j++) {
                int64_t i = start + j;
                if (i >= n) break;
                if (mode == 0) keys[size++] = abs_bits(lerp(m[i], g[i], weight1));
                else if (mode == 1) keys[size++] = abs_bits(g[i]);
                else keys[size++] = hash_bits(i, seeds[t]);
            }
        }
        double share = shares[t], mid = share * size;
        double margin = z * sqrt(size * share * (1 - share)) + 2;
        double upper = ceil(mid - margin), lower = floor(mid + margin);
        los[t] = lower >= size ? 0 : kth_largest(keys, size, (int)lower);
        his[t] = upper < 1 ? 0x80000000LL : (int64_t)kth_largest(keys, size, (int)upper) + 1;
    }
}

/* Flat indices of the first `take` coordinates whose key equals `value` (ties at the threshold,
 * broken by index); returns how many were found. */
int64_t mofo_ties(int64_t n, const float *grad, const float *exp_avg, int mode, uint32_t seed,
                  uint32_t value, int64_t take, int64_t *out) {
    uint32_t keys[BLOCK];
    int64_t found = 0;
    for (int64_t s = 0; s < n && found < take; s += BLOCK) {
        int len = (int)(n - s < BLOCK ? n - s : BLOCK);
        key_block(mode, exp_avg + s, grad + s, s, len, seed, keys);
        for (int j = 0; j < len && found < take; j++)
            if (keys[j] == value) out[found++] = s + j;
    }
    return found;
}

/* ---- the whole step, one tensor at a time (one process: counts are not reduced) ---------- */

#define KEY_END 0x80000000LL
#define REFINE_SHIFT 10
#define MAX_PASSES 8

/* Smallest s with 2^s >= value (value >= 1). */
static int ceil_log2_i64(int64_t value) {
    int s = 0;
    while (value > 1 && ((int64_t)1 << s) < value) s++;
    return s;
}

/* Bin width exponent so that nbins bins cover `width` bit patterns (select.shift_for). */
static int shift_for(int64_t width, int nbins) {
    int64_t per_bin = (width + nbins - 1) / nbins;
    return ceil_log2_i64(per_bin < 1 ? 1 : per_bin);
}

static void count_one(int mode, const float *g, const float *m, int64_t n, uint32_t seed,
                      uint32_t lo, int shift, int nbins, int64_t *counts) {
    memset(counts, 0, sizeof(int64_t) * (nbins + 1));
#if defined(__AVX512F__)
    if (mode != 2) {
        count_avx512(mode == 1 ? g : m, 0, n, lo, shift, nbins, counts);
        return;
    }
#endif
    uint32_t keys[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int len = (int)(n - s < BLOCK ? n - s : BLOCK);
        key_block(mode, m + s, g + s, s, len, seed, keys);
        histogram(keys, len, lo, shift, nbins, counts);
    }
}

/* For each tensor listed in which[0..count): bracket, moments + histogram, threshold search and
 * masked step, back to back, so that the step's second sweep finds m and v still in cache (the
 * batched passes stream every tensor through memory twice). Same keys, same counts and the same
 * decisions as select.search with identity reduction, so the result is bit-identical.
 * ks[t] == 0 marks a tensor that is not filtered (every coordinate moves). Per tensor out:
 * moved, and tie_values/tie_takes (-1 / 0 when no tie at the threshold is left to break). */
void mofo_step_each(int count, const int32_t *which, const int64_t *numels,
                    float *const *params, float *const *grads, float *const *exp_avgs,
                    float *const *exp_avg_sqs, float weight1, float beta2, float weight2,
                    int mode, const uint32_t *seeds, const int64_t *ks,
                    const int64_t *tolerances, const float *decays, const float *neg_steps,
                    const float *bias2_sqrts, float eps, int decay_all, int per_tensor, int run,
                    double z, int nbins, int64_t *counts, int64_t *at_least, int64_t *moved,
                    int64_t *tie_values, int64_t *tie_takes) {
    for (int c = 0; c < count; c++) {
        const int t = which[c];
        const int64_t n = numels[t], k = ks[t], tol = tolerances[t];
        float *p = params[t], *g = grads[t], *m = exp_avgs[t], *v = exp_avg_sqs[t];
        int64_t zero = 0;
        uint32_t threshold = 0;
        tie_values[t] = -1;
        tie_takes[t] = 0;
        if (k <= 0) {
            mofo_moments(1, &n, &g, &m, &v, weight1, beta2, weight2, mode, seeds + t,
                         (const uint32_t *)&zero, (const int32_t[]){-1}, nbins, 0, n, counts);
        } else {
            int64_t lo, hi;
            double share = (double)k / (double)n;
            mofo_bracket(0, 1, &n, &g, &m, weight1, mode, seeds + t, per_tensor, run, &share,
                         z, &lo, &hi);
            int shift = shift_for(hi - lo > 1 ? hi - lo : 1, nbins);
            uint32_t lo32 = (uint32_t)lo;
            int32_t shift32 = shift;
            memset(counts, 0, sizeof(int64_t) * (nbins + 1));
            mofo_moments(1, &n, &g, &m, &v, weight1, beta2, weight2, mode, seeds + t, &lo32,
                         &shift32, nbins, 0, n, counts);
            int done = 0;
            for (int pass = 0; pass < MAX_PASSES && !done; pass++) {
                at_least[nbins] = counts[nbins];
                for (int j = nbins - 1; j >= 0; j--) at_least[j] = at_least[j + 1] + counts[j];
                int below = at_least[0] < k, over = at_least[nbins] >= k;
                int b = 0;
                while (b + 1 < nbins && at_least[b + 1] >= k) b++;
                int64_t missing = k - at_least[b + 1], extra = counts[b] - missing;
                int64_t edge = lo + ((int64_t)b << shift);
                int64_t next_edge = lo + ((int64_t)(b + 1) << shift);
                if (!below && !over) {
                    if (extra <= tol && extra <= missing) {
                        threshold = (uint32_t)edge;
                        done = 1;
                    } else if (missing <= tol) {
                        threshold = (uint32_t)next_edge;
                        done = 1;
                    } else if (shift == 0) {
                        threshold = (uint32_t)next_edge;
                        tie_values[t] = edge;
                        tie_takes[t] = missing;
                        done = 1;
                    }
                }
                if (done) break;
                int64_t old_lo = lo;
                if (below) {
                    lo = 0;
                    shift = shift_for(old_lo, nbins);
                } else if (over) {
                    lo = next_edge < KEY_END ? next_edge : KEY_END;
                    shift = shift_for(KEY_END - lo, nbins);
                } else {
                    lo = edge;
                    shift = shift > REFINE_SHIFT ? shift - REFINE_SHIFT : 0;
                }
                count_one(mode, g, m, n, seeds[t], (uint32_t)lo, shift, nbins, counts);
            }
            if (!done) {  /* cannot happen with consistent counts; make Python raise */
                moved[t] = -1;
                continue;
            }
        }
        int64_t got = 0;
        mofo_update(1, &n, &p, &g, &m, &v, mode, seeds + t, &threshold, decays + t,
                    neg_steps + t, bias2_sqrts + t, eps, decay_all, 0, n, &got);
        moved[t] = got;
    }
}
