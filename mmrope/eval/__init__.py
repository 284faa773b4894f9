"""Evaluation: long-context VQA (`vqa`, `distractors`, `scoring`) and training-time probes (`probe`).

Imported by training code only through the trainer's eval hook; the submodules are imported on demand.
"""
