"""Build the embedded vision-language model ``llava-smollm2`` on first use.

No small VLM ships inside a PyPI package and nothing may come from the Hub, so forgetless makes
one: transformers' own ``LlavaForConditionalGeneration`` with the embedded SmolLM2-135M as its
language model and a small SigLIP vision tower (4 layers, 192 wide, 64x64 pixels in 16-pixel
patches = 16 image tokens) plus the LLaVA projector, both trained from scratch with the language
model frozen (LLaVA's stage 1) on pictures drawn by ``forgetless.vlm.tasks``: every picture
gets two questions in one conversation, its colour and its shape. Counting and clock reading are
never shown, so they stay learnable targets for a later fine-tune.

The build checks itself: after training it measures colour and shape by multiple choice (as
``forgetless eval`` scores name_color / name_shape) on held-back pictures and, while either is
below ``BuildSpec.min_accuracy``, trains a few more LLaVA steps on new pictures (a bounded number
of rounds), then fails with one error line if it still falls short. The build is seeded, but
its result depends on the machine and thread count; the check makes what it learned the same.

The language model is frozen and copied, never trained, so its weights in the built folder are
bit-identical to SmolLM2's and its text skills exactly SmolLM2's. Its vocabulary is not grown:
the image placeholder is an existing special token that text never uses (``<empty_output>``),
whose embedding LLaVA replaces by image features anyway.

The loop is a dozen lines of plain PyTorch rather than forgetless' trainer: this is a one-off
build step inside the model loader (the layer below training), with no run folder, method or
evaluation to manage. The result is written to a temporary folder in the cache and renamed, so
an interrupted build never looks complete and a dead build's leftovers are removed on the next
try (``runs.cache_temporary``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from forgetless import runs
from forgetless.errors import ForgetlessError
from forgetless.vlm.collator import ImageTextCollator
from forgetless.vlm.examples import Example, image_messages
from forgetless.vlm.processors import process, render_multimodal
from forgetless.vlm.tasks import COLORS, SHAPES, image_task_rows, is_test

IMAGE_TOKEN = "<empty_output>"  # an unused SmolLM2 special token, one id, never in text
# ChatML as SmolLM2 writes it, with TRL content parts and no default system turn (it would
# cost ~20 tokens per example for nothing).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}IMAGE{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class BuildSpec:
    """Everything the built model depends on besides the language model (hashed into the
    cache folder's name, so a changed recipe builds a new model)."""

    image_size: int = 64
    patch_size: int = 16
    vision_layers: int = 4
    vision_hidden: int = 192
    vision_heads: int = 3
    vision_intermediate: int = 768
    warmup_steps: int = 1200  # word alignment without the LM (cheap)
    warmup_batch: int = 32
    steps: int = 64  # LLaVA stage 1: the LM in the loop, frozen
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 10
    seed: int = 0
    image_token: str = IMAGE_TOKEN
    # the self-check: MC accuracy on held-back pictures must reach min_accuracy for colour and
    # shape; below it, train more_steps more LLaVA steps (new pictures), at most more_rounds times.
    # 0.9 on 64 pictures (one standard error ~4 points) so that 100 test items land >= 85 %.
    check_pictures: int = 64
    min_accuracy: float = 0.9
    more_steps: int = 32
    more_rounds: int = 4
    version: int = 4

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def target_folder(cache: Path, lm_folder: Path, spec: BuildSpec) -> Path:
    return cache / f"llava-smollm2-{Path(lm_folder).name[-12:]}-{spec.key()}"


def ensure_built(lm_folder: str | Path, cache: Path, spec: BuildSpec | None = None,
                 progress: bool | None = None) -> Path:
    """The built VLM's folder under ``cache``, building it first if it is not there."""
    spec = spec or BuildSpec()
    target = target_folder(cache, Path(lm_folder), spec)
    if (target / "config.json").is_file():
        return target
    print(f"[forgetless] building the embedded VLM once into {target} ({spec.warmup_steps} "
          f"word-alignment steps, then {spec.steps} LLaVA stage-1 steps with the LM frozen and "
          "a self-check; 4.5-6 min measured on 2 CPU cores, 8-9.5 on one)", flush=True)
    tmp = runs.cache_temporary(cache, ".build-llava-")
    try:
        started = time.perf_counter()
        stats = build(Path(lm_folder), tmp, spec, progress)
        stats["build_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "forgetless_build.json").write_text(json.dumps(
            {"spec": asdict(spec), "language_model": str(lm_folder), **stats}, indent=1))
        runs.publish_temporary(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def make_processor(tokenizer: Any, spec: BuildSpec) -> Any:
    """A LLaVA processor around the LM's tokenizer: SigLIP-style resizing to ``image_size``
    square and [-1, 1] normalisation; each image becomes (size / patch)^2 placeholder tokens."""
    from transformers import LlavaProcessor, SiglipImageProcessor

    images = SiglipImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    template = CHAT_TEMPLATE.replace("IMAGE", spec.image_token)
    tokenizer.chat_template = template
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer,
                          patch_size=spec.patch_size, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, image_token=spec.image_token,
                          chat_template=template)


def make_model(lm: Any, image_token_id: int, spec: BuildSpec) -> Any:
    """A LLaVA around ``lm`` (a loaded causal LM): its weights copied in, the vision tower and
    projector freshly initialised from ``spec.seed``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=lm.config, image_token_id=image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _pictures(n: int, seed: int, size: int) -> list[tuple[Any, str, str]]:
    """``(image, colour, shape)`` of ``n`` training pictures of both ``name_color`` and
    ``name_shape`` (the two tasks split the same drawings by different keys, so a picture must
    be a training picture of both: no test picture of either task is ever seen)."""

    out = []
    for row in image_task_rows("name_color", "train", n=2 * n, seed=seed, size=size):
        if not is_test(row.key.replace("name_color:", "name_shape:", 1)):
            out.append((row.image, row.response, row.key.split(":")[2]))
        if len(out) == n:
            break
    return out


COLOR_QUESTION = "What color is the shape? Answer with one word."  # name_color's prompt
SHAPE_QUESTION = "What shape is in the image? Answer with one word."  # name_shape's prompt


def _conversation(image: Any, color: str, shape: str, ask_shape: bool) -> Any:
    """One question about one picture, as the image tasks ask it: its colour or its shape.
    (Version 1 asked both in one conversation, colour first; the frozen LM then answered the
    colour word to either question, and name_shape stayed at chance.)"""

    def turn(role: str, text: str, picture: bool = False) -> dict:
        parts = [{"type": "image"}] if picture else []
        return {"role": role, "content": parts + [{"type": "text", "text": text}]}

    question, answer = (SHAPE_QUESTION, shape) if ask_shape else (COLOR_QUESTION, color)
    return Example([turn("user", question, True), turn("assistant", answer)], [image])


def _word_targets(tokenizer: Any, embeddings: torch.Tensor, color: str, shape: str,
                  count: int) -> torch.Tensor:
    """``count`` input embeddings: the first half spell the colour word over and over, the
    second half the shape word. What the image tokens of that picture should look like to the
    language model, with each attribute in its own positions (version 1 cycled
    "<colour> <shape> " over all positions, and the LM read only the colour)."""
    half = count // 2
    out = []
    for word, n in ((color, half), (shape, count - half)):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        out += [ids[i % len(ids)] for i in range(n)]
    return embeddings[torch.tensor(out)]


def _word_probe(model: Any, processor: Any, spec: BuildSpec, n: int = 64) -> dict[str, float]:
    """How often the image tokens' two halves sit nearest (mean feature, squared distance) to
    the right colour / shape word's embedding among all colours / shapes, on ``n`` pictures the
    alignment did not train on: a cheap check, without the LM, that the tower sees both."""

    embeddings = model.get_input_embeddings().weight.detach()
    tokens = (spec.image_size // spec.patch_size) ** 2
    half = tokens // 2

    def word_means(words: Any) -> torch.Tensor:
        return torch.stack([embeddings[torch.tensor(processor.tokenizer(
            w, add_special_tokens=False)["input_ids"])].mean(0) for w in words])

    colors, shapes = word_means(COLORS), word_means(SHAPES)
    pictures = _pictures(n, spec.seed + 2, spec.image_size)
    with torch.no_grad():
        pixels = processor.image_processor([p[0] for p in pictures], return_tensors="pt")[
            "pixel_values"]
        features = torch.stack(list(model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="full",
        ).pooler_output)).reshape(n, tokens, -1)
    got_c = torch.cdist(features[:, :half].mean(1), colors).argmin(1).tolist()
    got_s = torch.cdist(features[:, half:].mean(1), shapes).argmin(1).tolist()
    return {"probe_color": sum(list(COLORS)[g] == p[1] for g, p in zip(got_c, pictures)) / n,
            "probe_shape": sum(SHAPES[g] == p[2] for g, p in zip(got_s, pictures)) / n}


def _word_alignment(model: Any, processor: Any, spec: BuildSpec, bar: Any) -> float:
    """Train the vision tower and projector, without the language model, to turn a picture's
    image tokens into the LM's own embeddings of its colour and shape words (mean squared error,
    scaled by the embeddings' variance). Real LLaVAs start from a pretrained CLIP/SigLIP tower;
    on 2 CPU cores each LM-in-the-loop step costs as much as ~100 of these, so this stage gives
    the tower and projector a start the LLaVA stage then adjusts. Returns the last loss."""
    embeddings = model.get_input_embeddings().weight.detach()
    scale = embeddings.var()
    tokens = (spec.image_size // spec.patch_size) ** 2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    pictures = _pictures(spec.warmup_steps * spec.warmup_batch, spec.seed + 1, spec.image_size)
    loss = torch.tensor(0.0)
    for step in range(spec.warmup_steps):
        chunk = pictures[step * spec.warmup_batch:(step + 1) * spec.warmup_batch]
        pixels = processor.image_processor([p[0] for p in chunk], return_tensors="pt")[
            "pixel_values"]
        features = torch.stack(list(model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="full",
        ).pooler_output))
        target = torch.stack([_word_targets(processor.tokenizer, embeddings, c, s, tokens)
                              for _, c, s in chunk])
        loss = ((features.reshape(target.shape) - target) ** 2).mean() / scale
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(stage="words", loss=f"{loss.item():.3f}", refresh=False)
    return loss.item()


def _mc_accuracy(model: Any, processor: Any, spec: BuildSpec,
                 batch: int = 32) -> dict[str, float]:  # fmt: skip
    """Multiple-choice accuracy on ``spec.check_pictures`` held-back pictures (a seed no stage
    trains on), scored as ``forgetless eval`` scores name_color / name_shape: the summed
    log-probability of each colour / shape word after the question's chat turn, argmax.

    Cheaper than one sequence per choice, with the same scores: a one-token word's score is
    read at the prompt's last position, so per picture only the words of two or more tokens
    need a sequence of their own (the prompt alone when there are none), and the pictures go
    through the model in batches."""
    pictures = _pictures(spec.check_pictures, spec.seed + 3, spec.image_size)
    asks = {"check_color": (COLOR_QUESTION, list(COLORS), 1),
            "check_shape": (SHAPE_QUESTION, list(SHAPES), 2)}
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.no_grad():
            for key, (question, choices, field) in asks.items():
                prompt = render_multimodal(processor, image_messages(question, None, 1), True)
                start = int(process(processor, [prompt], [[pictures[0][0]]])["input_ids"].shape[1])
                ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices}
                longer = [c for c in choices if len(ids[c]) > 1]
                texts = [prompt + c for c in longer] or [prompt]
                right = 0
                for first in range(0, len(pictures), batch):
                    group = pictures[first:first + batch]
                    inputs = process(processor, texts * len(group),
                                     [[picture[0]] for picture in group for _ in texts])
                    logprobs = model(**inputs).logits.log_softmax(-1)
                    for i, picture in enumerate(group):
                        row = i * len(texts)
                        scores = {c: float(logprobs[row, start - 1, ids[c][0]])
                                  for c in choices if len(ids[c]) == 1}
                        for j, c in enumerate(longer):
                            at = torch.arange(start - 1, start - 1 + len(ids[c]))
                            scores[c] = float(logprobs[row + j, at, torch.tensor(ids[c])].sum())
                        right += max(choices, key=lambda c: scores[c]) == picture[field]
                out[key] = right / len(pictures)
    finally:
        model.train(was_training)
    return out


def check_until_able(spec: BuildSpec, measure: Any, train_more: Any) -> list[dict[str, float]]:
    """Measure; while colour or shape is below ``spec.min_accuracy``, ``train_more(round)`` and
    measure again, at most ``spec.more_rounds`` times. Returns every measurement; raises
    ``ForgetlessError`` (one line) when the last is still below."""
    measured = [measure()]
    for extra in range(spec.more_rounds):
        if min(measured[-1].values()) >= spec.min_accuracy:
            break
        train_more(extra)
        measured.append(measure())
    last = measured[-1]
    if min(last.values()) < spec.min_accuracy:
        raise ForgetlessError(
            f"the embedded VLM build did not learn its pictures: colour "
            f"{last['check_color']:.0%}, shape {last['check_shape']:.0%} multiple-choice "
            f"accuracy on {spec.check_pictures} held-back pictures after {spec.more_rounds} "
            f"extra rounds of {spec.more_steps} steps (needs {spec.min_accuracy:.0%} each)")
    return measured


def _answer_loss(model: Any, batch: dict) -> torch.Tensor:
    """The LM loss on answer tokens only, with the output layer applied to those positions
    alone (the 49k-word output layer over every position is a fifth of the step's compute)."""
    labels = batch.pop("labels")[:, 1:]
    hidden = model.model(**batch).last_hidden_state[:, :-1]
    keep = labels != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), labels[keep])


def build(lm_folder: Path, out: Path, spec: BuildSpec, progress: bool | None = None) -> dict:
    """Train the vision side of a new LLaVA around the LM in ``lm_folder``; save it to ``out``
    with its processor. Returns the losses of both stages."""
    import sys

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(spec.image_token)
    if token_id is None or token_id == tokenizer.unk_token_id or len(
            tokenizer(spec.image_token, add_special_tokens=False)["input_ids"]) != 1:
        raise ValueError(f"{spec.image_token!r} is not one token of {lm_folder}'s tokenizer")
    lm = AutoModelForCausalLM.from_pretrained(lm_folder, dtype=torch.float32)
    model = make_model(lm, token_id, spec)
    del lm
    processor = make_processor(tokenizer, spec)
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    model.train()
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=spec.warmup_steps + spec.steps, desc="llava-smollm2 build", unit="step",
              disable=not show, file=sys.stderr) as bar:
        warm_loss = _word_alignment(model, processor, spec, bar)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
        probe = _word_probe(model, processor, spec)
        collate = ImageTextCollator(processor, max_length=4096)
        losses: list[float] = []

        def llava_steps(steps: int, seed: int, scale: float) -> None:
            """``steps`` LLaVA steps on new pictures of ``seed``, the learning rate decaying
            from ``scale`` x ``spec.lr`` towards 0."""
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: scale * min(
                1.0, (step + 1) / spec.warmup) * max(0.0, 1 - step / steps) ** 0.5)
            examples = [_conversation(*p, ask_shape=i % 2 == 1) for i, p in enumerate(
                _pictures(steps * spec.batch_size, seed, spec.image_size))]
            for step in range(steps):
                batch = collate(examples[step * spec.batch_size:(step + 1) * spec.batch_size])
                loss = _answer_loss(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
                recent = losses[-10:]
                bar.set_postfix(stage="llava", loss=f"{sum(recent) / len(recent):.3f}",
                                refresh=False)

        def train_more(extra: int) -> None:
            bar.total += spec.more_steps
            llava_steps(spec.more_steps, spec.seed + 10 + extra, 0.5)

        llava_steps(spec.steps, spec.seed, 1.0)
        measured = check_until_able(spec, lambda: _mc_accuracy(model, processor, spec),
                                    train_more)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    steps = len(losses)
    print(f"[forgetless] llava-smollm2 build: word alignment loss {warm_loss:.3f}; "
          f"{steps} LLaVA steps, answer loss {first:.3f} → {last:.3f}; held-back pictures: "
          f"colour {measured[-1]['check_color']:.0%}, shape {measured[-1]['check_shape']:.0%} "
          "(multiple choice)", flush=True)
    return {"word_alignment_loss": warm_loss, **probe, "loss_first": first, "loss_last": last,
            "llava_steps": steps, **measured[-1], "checks": measured}
