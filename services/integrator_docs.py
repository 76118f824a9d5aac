"""Write the generated parts of the integrator docs: JSON Schemas and the tables in docs/integrators.md.

    python -m services.integrator_docs          # rewrite the files
    python -m services.integrator_docs --check  # exit 1 and name every file that is out of date

Generated from the code, so the docs cannot drift from it:
- docs/schema/<name>.schema.json: the JSON Schema (draft 2020-12) of each model in SCHEMAS, as
  pydantic generates it for validation, so it accepts exactly what sdrm.messages.parse accepts
  (apart from checks in model validators, such as a verdict's status against missing_heads).
- The blocks of docs/integrators.md between `<!-- generated:NAME -->` and
  `<!-- end generated:NAME -->`: the topic tables from topics.yaml and the Sparkplug metric tables
  from sdrm.sparkplug_metrics. Text outside the markers is written by hand and kept as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pydantic import BaseModel

from sdrm import messages
from sdrm.sparkplug_metrics import CAMERA_METRICS, NODE_METRICS, MetricSpec
from services.topics import TopicMap, TopicSpec, load_topics

REPOSITORY = Path(__file__).resolve().parent.parent
DOCS = REPOSITORY / "docs"
INTEGRATORS_PAGE = DOCS / "integrators.md"
SCHEMA_DIRECTORY = DOCS / "schema"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SPARKPLUG_NAMESPACE = "sparkplug"

SCHEMAS: dict[str, type[BaseModel]] = {"verdict": messages.Verdict, "status": messages.Status}


def schema_document(model: type[BaseModel]) -> dict:
    """Return the JSON Schema of model (validation mode) with its $schema dialect."""
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(mode="validation")}


def render_schema(model: type[BaseModel]) -> str:
    return json.dumps(schema_document(model), indent=2, ensure_ascii=False) + "\n"


def schema_path(name: str) -> Path:
    return SCHEMA_DIRECTORY / f"{name}.schema.json"


# ---------------------------------------------------------------------------------------------
# Tables


def topic_table(specs: list[TopicSpec]) -> str:
    """Return a Markdown table of topics: name, template, QoS, retain, payload, publishers, description."""
    rows = ["| Topic | Template | QoS | Retain | Payload | Published by | Description |", "|---|---|---|---|---|---|---|"]
    for spec in specs:
        description = " ".join(spec.description.split())
        if spec.will:
            description += f" Last will: `{spec.will}`."
        rows.append(
            f"| `{spec.name}` | `{spec.template}` | {spec.qos} | {'yes' if spec.retain else 'no'} | "
            f"`{spec.payload}` | {', '.join(spec.publishers)} | {_escape(description)} |"
        )
    return "\n".join(rows)


def metric_table(specs: tuple[MetricSpec, ...]) -> str:
    """Return a Markdown table of Sparkplug metrics: name, datatype, meaning."""
    rows = ["| Metric | Datatype | Meaning |", "|---|---|---|"]
    for spec in specs:
        rows.append(f"| `{spec.name}` | {spec.datatype.spec_name} | {_escape(spec.description)} |")
    return "\n".join(rows)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def generated_blocks(main: TopicMap, with_sparkplug: TopicMap) -> dict[str, str]:
    """Return {block name: Markdown} for every generated block of docs/integrators.md."""
    sdrm_specs = [main.spec(name) for name in main]
    sparkplug_specs = [with_sparkplug.spec(name) for name in with_sparkplug if name not in main]
    return {
        "sdrm-topics": topic_table(sdrm_specs),
        "sparkplug-topics": topic_table(sparkplug_specs),
        "sparkplug-node-metrics": metric_table(NODE_METRICS),
        "sparkplug-camera-metrics": metric_table(CAMERA_METRICS),
    }


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace the content between each block's markers in text.

    Raises ValueError naming the block whose markers are missing.
    """
    for name, content in blocks.items():
        pattern = re.compile(
            rf"(^<!-- generated:{re.escape(name)} -->\n).*?(^<!-- end generated:{re.escape(name)} -->$)",
            re.DOTALL | re.MULTILINE,
        )
        if not pattern.search(text):
            raise ValueError(
                f"markers of block {name!r} not found: add '<!-- generated:{name} -->' and "
                f"'<!-- end generated:{name} -->' on lines of their own"
            )
        text = pattern.sub(lambda match: match.group(1) + content + "\n" + match.group(2), text)
    return text


# ---------------------------------------------------------------------------------------------
# Files


def expected_files() -> dict[Path, str]:
    """Return {path: the content that path must have} for every generated file."""
    files = {schema_path(name): render_schema(model) for name, model in SCHEMAS.items()}
    blocks = generated_blocks(load_topics(), load_topics(namespaces=(SPARKPLUG_NAMESPACE,)))
    files[INTEGRATORS_PAGE] = replace_blocks(INTEGRATORS_PAGE.read_text(encoding="utf-8"), blocks)
    return files


def stale_files() -> list[Path]:
    """Return the generated files whose content differs from what the code generates now."""
    stale = []
    for path, content in expected_files().items():
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.integrator_docs",
        description="Write the verdict and status JSON Schemas and the generated tables of docs/integrators.md.",
    )
    parser.add_argument("--check", action="store_true", help="write nothing, and exit 1 when a generated file is out of date")
    args = parser.parse_args(argv)

    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"out of date: {path.relative_to(REPOSITORY)}", file=sys.stderr)
        if stale:
            print("run `python -m services.integrator_docs` to regenerate", file=sys.stderr)
        return 1 if stale else 0

    for path, content in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path.relative_to(REPOSITORY)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
