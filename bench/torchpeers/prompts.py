"""The decode benchmark's prompts, shared by the driver (for `strata generate`) and the
PyTorch peer, so both decode the same text.

Prompt i is the first `length` characters of the i-th of `batch` evenly spaced lines (of at
least `length` characters) of the validation text (the last 10% of the file, as Strata
splits it). Lines hold no newline, so a prompts file has one prompt per line.
"""

from __future__ import annotations


def prompts(data_path: str, batch: int, length: int) -> list[str]:
    with open(data_path, encoding="utf-8") as f:
        text = f.read()
    val = text[len(text) * 9 // 10:]
    lines = [ln[:length] for ln in val.splitlines()
             if len(ln) >= length and ln[:length] == ln[:length].strip()]
    if len(lines) < batch:
        raise SystemExit(f"{data_path}: only {len(lines)} validation lines of {length} "
                         f"characters; fix: a shorter --prompt-len or a smaller batch")
    step = len(lines) // batch
    return [lines[i * step] for i in range(batch)]
