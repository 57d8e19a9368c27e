"""Produce adapters: `switchboard train` fine-tunes one PEFT adapter (LoRA, KronA, (IA)3, prefix) on a JSONL file.

The adapter modules are Hugging Face PEFT's own, so the output is a standard PEFT directory that PEFT and our
server both load. This package never imports `switchboard.serving`.
"""
