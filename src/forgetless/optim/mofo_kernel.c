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

/* Keys of this step's new momentum (or gradient / hash) at `per_tensor` sampled positions, read
 * in runs of `run` neighbours so each run costs one or two cache misses; -1 marks no sample. */
void mofo_sample(int T, const int64_t *numels, float *const *grads, float *const *exp_avgs,
                 float weight1, int mode, const uint32_t *seeds, int per_tensor, int run,
                 int64_t *out) {
    for (int t = 0; t < T; t++) {
        int64_t n = numels[t], *row = out + (int64_t)t * per_tensor;
        const float *g = grads[t], *m = exp_avgs[t];
        int runs = per_tensor / run;
        for (int r = 0; r < runs; r++) {
            int64_t first = r * run;
            if (n > per_tensor) {
                int64_t stride = n / runs;
                first = r * stride + mix32((uint32_t)r ^ seeds[t]) % (uint32_t)(stride - run + 1);
            }
            for (int j = 0; j < run; j++) {
                int64_t i = first + j;
                int64_t *slot = row + (int64_t)r * run + j;
                if (i >= n) *slot = -1;
                else if (mode == 0) *slot = abs_bits(lerp(m[i], g[i], weight1));
                else if (mode == 1) *slot = abs_bits(g[i]);
                else *slot = hash_bits(i, seeds[t]);
            }
        }
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
