"""MODEL_CARD.md: what a trained model directory is, how it was made and how well it does beside the
obvious alternatives, written by each trainer into the model it publishes.

Everything in it is read from what the run already recorded (training_args.json's settings, the
toolkit block of config.json, the run's results), so the card cannot disagree with the model. The
header is the Hugging Face Hub's YAML front matter: the file can be pushed as a repository's README.md.
Data files are named by file name, size and sha256, not by their path on the training machine.
"""
import datetime
import platform
import shlex
from pathlib import Path

from common import checkpoints, files, modeldir

CARD_FILE = "MODEL_CARD.md"
DATA_OPTIONS = (("training", "data_path"), ("validation", "val_path"), ("test", "test_path"),
                ("unlabeled", "unlabeled_path"))
USE_COMMANDS = {
    "vector": ('python infer.py --model-path {dir} --text "a query"',
               "python train_vector.py --mode deploy --model-path {dir}",
               "python export_onnx.py --model-path {dir} --output-path models/model.onnx"),
    "default": ('python infer.py --model-path {dir} --text "a text"',
                "python infer.py --model-path {dir} --serve",
                "python export_onnx.py --model-path {dir} --output-path models/model.onnx"),
}


def write_model_card(model_dir, script, args, results, metrics):
    """Write MODEL_CARD.md into ``model_dir`` (refreshing its checksums when it has them).

    ``results``: the run's results as its metrics.json holds them (the model on validation and test,
    and its alternatives: "untuned", "baseline", "majority_baseline", "fusion"...); ``metrics``: the
    columns of the results table."""
    _, toolkit = modeldir.read_model_config(model_dir)  # final: after calibration and fusion
    text = "\n".join([front_matter(args, toolkit), f"# {title(toolkit, args)}", "",
                      provenance(script, args), "", *data_section(args),
                      *results_section(result_rows(results), metrics),
                      *stored_section(toolkit), *use_section(toolkit), *environment_section(args)])
    path = Path(model_dir) / CARD_FILE
    files.write_output_file(path, text, "--output-dir")
    if (Path(model_dir) / checkpoints.CHECKSUM_FILE).is_file():
        checkpoints.write_checksums(model_dir)
    return path


def hub_id(args):
    """The base model's Hub id, or None for a local directory (which names no repository)."""
    name = str(args.model_name)
    return None if Path(name).exists() else name


def base_model_name(args):
    """The base model as the Hub knows it: an id as given, a local directory by its name only."""
    return hub_id(args) or Path(str(args.model_name)).name


def front_matter(args, toolkit):
    # no library_name: the head is this toolkit's, so transformers' pipelines would not load it whole
    lines = ["---", "tags:", "- bert-finetune-toolkit", f"- {task_tag(toolkit)}"]
    if hub_id(args):
        lines.append(f"base_model: {hub_id(args)}")
    return "\n".join(lines + ["---", ""])


def task_tag(toolkit):
    if toolkit.get("task") == "vector":
        return "sentence-similarity"
    return "text-ranking" if toolkit.get("problem_type") == "rerank" else "text-classification"


def title(toolkit, args):
    kind = {"vector": "Embedding model", "longdoc": "Long-document classifier"}.get(toolkit.get("task"), "Classifier")
    if toolkit.get("problem_type") == "rerank":
        kind = "Reranker (cross-encoder)"
    return f"{kind} fine-tuned from {base_model_name(args)}"


def provenance(script, args):
    """How the run was started (the arguments as given, an absolute path cut to its last part: the card
    is made to be shared, the training machine's directories are not) and when."""
    command = " ".join(shlex.quote(Path(argument).name if Path(argument).is_absolute() else argument)
                       for argument in getattr(args, "command_line", []))
    return (f"Trained with `python {script} {command}` on {datetime.date.today().isoformat()} (absolute paths "
            "shortened to their last part). Every setting, defaults included, is in `training_args.json` beside "
            "this card.")


def data_section(args):
    rows = [(option, split, Path(getattr(args, option))) for split, option in DATA_OPTIONS
            if getattr(args, option, None)]
    if not rows:
        return []
    lines = ["## Data", "", "| split | file | bytes | sha256 |", "|---|---|---|---|"]
    digests = getattr(args, "input_digests", {})  # the run hashed its training inputs at the start (resume checks)
    for option, split, path in rows:
        if path.is_file():
            digest = digests.get(option) or checkpoints.file_sha256(path)
            lines.append(f"| {split} | {path.name} | {path.stat().st_size} | {digest} |")
        else:  # a datasets directory saved to disk, or a split the run carved from the training file
            lines.append(f"| {split} | {path.name} | - | - |")
    return lines + [""]


def result_rows(results):
    """[(what, split, {metric: value})]: the model first, then the alternatives on the same data."""
    split = "test" if "test" in results else "validation"
    baseline = results.get("baseline") or {}
    fused = (results.get("fusion") or {}).get("evaluation")
    rows = [("this model", "validation", results.get("validation")),
            ("this model", "test", results.get("test")),
            ("the untuned base model", "validation", (results.get("untuned") or {}).get("validation")),
            (f"TF-IDF baseline ({baseline.get('name', 'tfidf')})", split, baseline),
            ("majority class", split, results.get("majority_baseline")),
            ("constant prediction", split, results.get("constant_baseline"))]
    if fused:
        rows.append((f"this model fused with the TF-IDF baseline (its share {results['fusion']['weight']:g})",
                     split, fused))
    reranked = results.get("retrieve_then_rerank")
    if reranked:
        top, reranked_split = reranked.get("rerank_top", "N"), reranked.get("split", split)
        rows += [(f"the retriever alone (its top {top})", reranked_split, reranked.get("before")),
                 (f"the retriever's top {top} reranked by this model", reranked_split, reranked.get("after")),
                 ("the same, fused with the retriever's score", reranked_split, reranked.get("fused"))]
    return rows


def results_section(rows, metrics):
    rows = [(what, split, values) for what, split, values in rows if values]
    if not rows or not metrics:
        return []
    lines = ["## Results", "", "| model | split | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for what, split, values in rows:
        cells = [format_value(values.get(metric, values.get(f"eval_{metric}"))) for metric in metrics]
        lines.append(f"| {what} | {split} | " + " | ".join(cells) + " |")
    return lines + ["", "The untuned model competes during training: it is published unless training beats "
                        "it on validation.", ""]


def format_value(value):
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def stored_section(toolkit):
    """The settings inference, serving and export reuse, as config.json's toolkit block holds them."""
    shown = {key: value for key, value in toolkit.items() if key not in ("format_version", "head", "task")}
    if not shown:
        return []
    lines = ["## Stored with the model", "",
             "Applied by `infer.py`, the server and the ONNX export (config.json, `toolkit`):", ""]
    lines += [f"- `{key}`: {format_setting(value)}" for key, value in shown.items()]
    return lines + [""]


def format_setting(value):
    if isinstance(value, dict):
        return ", ".join(f"{key} {format_setting(item)}" for key, item in value.items() if item is not None)
    if isinstance(value, list) and len(value) > 12:
        return f"{len(value)} values"
    return str(value)


def use_section(toolkit):
    commands = USE_COMMANDS["vector" if toolkit.get("task") == "vector" else "default"]
    return ["## Use", "", "```bash", *(command.format(dir="MODEL_DIR") for command in commands), "```",
            "", "`MODEL_DIR` is this directory.", ""]


def environment_section(args):
    import torch
    import transformers
    device = getattr(args, "device_obj", None) or getattr(args, "device", "cpu")
    return ["## Environment", "",
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"device {device}, precision {getattr(args, 'precision', '-')}, seed {getattr(args, 'seed', '-')}.", ""]
