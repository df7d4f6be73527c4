"""`python -m bertfast.fill_mask MODEL "text with [MASK]"`: what the masked-LM head predicts at each [MASK].

    python -m bertfast.fill_mask runs/bertfast "On the third day the weather was [MASK] at the farm."
    python -m bertfast.fill_mask bert-base-uncased "Paris is the [MASK] of France." --top-k 3

MODEL is anything bertfast.train.pretrained.load_pretrained takes (a bertfast run folder or checkpoint, a transformers
folder, a hub name in the local cache). For each [MASK] (the tokenizer's mask token) it prints the top-k tokens
with their probabilities, and the text with every mask filled by its most likely token. From Python:
`fill_mask(model, tokenizer, text, top_k=5)`.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bertfast._cli import Parser


class FillMaskError(ValueError):
    """The text cannot be scored (no mask token, too long)."""


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each mask token of `text`, in order, the `top_k` (token, probability) pairs the MLM head predicts."""
    mask = tokenizer.mask_token
    if mask is None:
        raise FillMaskError("the tokenizer has no mask token")
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    positions = (ids[0] == tokenizer.mask_token_id).nonzero().squeeze(1).tolist()
    if not positions:
        raise FillMaskError(f"no {mask} in the text {text!r}: write {mask} where a word should be predicted")
    if ids.shape[1] > model.config.max_len:
        raise FillMaskError(f"the text is {ids.shape[1]} tokens long, the model takes at most {model.config.max_len}")
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(ids.to(device), enc["attention_mask"].to(device),
                    enc.get("token_type_ids", torch.zeros_like(ids)).to(device))
    finally:
        model.train(was)
    scores = out.prediction_scores[0, positions].float()  # [masks, vocab]
    probs = scores.softmax(-1)[:, :len(tokenizer)]  # the model's vocabulary may be padded past the tokenizer's
    k = min(top_k, probs.shape[-1])
    top = probs.topk(k, dim=-1)
    result = []
    for p_row, i_row in zip(top.values.tolist(), top.indices.tolist()):
        result.append([(tokenizer.convert_ids_to_tokens(i), p) for i, p in zip(i_row, p_row)])
    return result


def filled_text(tokenizer, text: str, predictions: list[list[tuple[str, float]]]) -> str:
    """`text` with each mask replaced by its most likely token (WordPiece pieces joined back)."""
    enc = tokenizer(text)["input_ids"]
    best = iter(tokenizer.convert_tokens_to_ids(p[0][0]) for p in predictions)
    ids = [next(best) if i == tokenizer.mask_token_id else i for i in enc]
    return tokenizer.decode(ids, skip_special_tokens=True)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m bertfast.fill_mask",
        description="Top-k predictions of a BERT's masked-LM head at each [MASK] of a text.")
    p.add_argument("model", help="a bertfast run folder or checkpoint, a transformers folder or a hub name")
    p.add_argument("text", nargs="+", help="one or more texts, each with at least one [MASK]")
    p.add_argument("--top-k", type=int, default=5, help="predictions shown per mask")
    p.add_argument("--tokenizer", default=None, help="a tokenizer instead of the model's own")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object per text instead of a table")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"argument --top-k: must be >= 1, got {args.top_k}")
    from bertfast.train.pretrained import load_pretrained

    try:
        model, tok = load_pretrained(args.model, device=args.device, tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"argument model: {e}")
    except RuntimeError as e:  # e.g. a device that is not there
        parser.error(f"argument --device: {e}")
    for text in args.text:
        try:
            preds = fill_mask(model, tok, text, args.top_k)
        except FillMaskError as e:
            parser.error(f"argument text: {e}")
        if args.json:
            print(json.dumps({"text": text, "filled": filled_text(tok, text, preds),
                              "masks": [[{"token": t, "prob": p} for t, p in row] for row in preds]}))
            continue
        print(text)
        for n, row in enumerate(preds, 1):
            print(f"  {tok.mask_token} {n}: " + "  ".join(f"{t} {p:.3f}" for t, p in row))
        print(f"  -> {filled_text(tok, text, preds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
