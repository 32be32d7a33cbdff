"""The apet_sample task's functions: apet eval's data format, prompts and scores, for lmms-eval."""

from pathlib import Path

from apet_trt.scripts.eval.lmms_eval_task import task_functions

doc_to_visual, doc_to_text, process_results = task_functions(Path(__file__).resolve().parent.parent)
