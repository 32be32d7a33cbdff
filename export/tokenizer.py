"""A tokenizer made locally, for presets (no hub, no network).

Byte-level: every UTF-8 byte is a token, so any text round-trips. The ids follow LLaMA's layout
where it matters to LLaVA: <unk>=0, <s>=1, </s>=2, then the 256 byte tokens, then reserved
fillers up to the image token's id, then <image> (and <video> for video families) and <pad>. With
image_token_id=32000 the vocabulary lines up with LLaVA-1.5-7B's (image token 32000, pad 32001,
config vocab 32064) and, with the video token, Video-LLaVA-7B's (<image> 32000, <video> 32001).
"""

from __future__ import annotations

SPECIALS_BEFORE = ["<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VIDEO_TOKEN = "<video>"


def byte_level_tokenizer(image_token_id: int | None = None, *, video_token: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS_BEFORE)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    if image_token_id is None:
        image_token_id = len(vocab)
    if image_token_id < len(vocab):
        raise ValueError(f"image_token_id={image_token_id} collides with the {len(vocab)} base tokens")
    while len(vocab) < image_token_id:
        vocab[f"<reserved_{len(vocab)}>"] = len(vocab)
    media = [IMAGE_TOKEN, VIDEO_TOKEN] if video_token else [IMAGE_TOKEN]
    for i, tok in enumerate([*media, PAD_TOKEN]):
        vocab[tok] = image_token_id + i

    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS_BEFORE + media + [PAD_TOKEN])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, **({"video_token": VIDEO_TOKEN} if video_token else {})},
    )
