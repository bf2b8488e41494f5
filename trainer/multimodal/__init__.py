"""LLaVA-style multimodal fine-tuning on the standard stack: CLIP vision tower + 2-layer MLP projector
+ a chat LLM, as transformers' own `LlavaForConditionalGeneration`.

    python -m trainer mm-demo                                # the whole thing on tiny models, offline
    python -m trainer mm-shapes data/shapes                  # a toy image dataset to try it on
    python -m trainer repeat data/unique.json data/repeated.json -n 200
    python -m trainer mm-build LLM_DIR --visual-encoder CLIP_DIR OUT   # the assembled (untrained) LLaVA
    python -m trainer mm-train llava_tiny_pretrain --data captions.jsonl --image-folder imgs/
    python -m trainer mm-train llava_tiny_finetune --data qa.jsonl --image-folder imgs/ \
                               --set pretrained_projector=work_dirs/llava_pretrain/final
    python -m trainer mm-export work_dirs/llava_finetune/final out/merged --merge
    python -m trainer chat out/merged --image photo.jpg

One job per file:
    synthetic.py  coloured shapes drawn with PIL: the offline demo/test data set (captions + questions)
    standins.py   tiny stand-ins for the downloads: a CLIP-style tower and a chat LLM that know the shapes
    data.py       LLaVA/ShareGPT image records: <image> tag and image-file checks (FILE:LINE errors),
                  encoding with assistant-only labels, image-token expansion, the batch collator
    repeat.py     `python -m trainer repeat`: repeat a small data set N times (the course's repeat.py)
    config.py     MultimodalConfig: TrainConfig plus the LLaVA fields; `llava_*` presets
    model.py      assemble LLM + CLIP + projector into LlavaForConditionalGeneration + LlavaProcessor
    train.py      `mm-train`: stage pretrain (projector only) or finetune (LoRA/QLoRA + projector)
    callbacks.py  sample chats about an evaluation image; llava.json in every checkpoint
    export.py     `mm-export`: a checkpoint -> adapter + projector files, or a merged LLaVA dir
    chat.py       ImageChatEngine (the shared ChatEngine with an image) and the loader behind `chat --image`
    demo.py       `mm-demo`: the course's before/after comparison on the tiny models, end to end
"""
