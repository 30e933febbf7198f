"""The embedded default: a small world in which every step of ZEDA runs on a CPU in minutes.

    tasks.py      three verifiable task families (math, code, instruction following): data and benchmark
    tokenizer.py  a character-level HF tokenizer with a Qwen-style chat template
    teacher.py    trains the two shipped MoE teachers (assets/) from scratch
    tiny.py       tiny random HF checkpoints of both architectures, built with transformers' classes
    stages.py     runs the user's scripts as processes; the shared pieces of pipeline.py and the frontier

Nothing here is part of the method: zeda/ treats these teachers like any downloaded checkpoint. The one edge
back is zeda/evaluation.py scoring the task suite, the default benchmark of evaluate.py.
"""
