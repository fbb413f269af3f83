"""Vision-language models in one place: what is a processor, image files, image-text batches,
the built-in image tasks and the embedded ``llava-smollm2`` builder.

data, models and eval import from here; nothing here imports them (the layer below).

* ``examples``: ``Example`` (a conversation and its images) and message helpers;
* ``processors``: ``is_processor``, ``text_tokenizer``, ``render_multimodal``, ``process``;
* ``images``: ``check_image`` (one line per bad file), ``open_image``;
* ``collator``: ``ImageTextCollator``;
* ``tasks``: the Pillow-drawn image tasks (``IMAGE_TASKS``, ``image_task_rows``);
* ``build``: ``ensure_built``, the embedded VLM built on first use.
"""
