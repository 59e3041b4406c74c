#!/usr/bin/env python3
"""Renders the Helm charts under manifests/chart/ without Helm.

The chart templates use a small subset of Helm's template language, so that this script and
`helm template` give the same YAML:

    {{ .Values.a.b }}                    a value from values.yaml (or --set)
    {{ .Values.a.b | quote }}            the same, as a quoted string
    {{ .Release.Namespace }}             the namespace installed into
    {{- toYaml .Values.a | nindent N }}  a map or list as YAML, on new lines indented by N
    {{- if .Values.a }} ... {{- end }}   a block kept only when the value is set and not empty

and `{{-` / `-}}` trim whitespace as in Go templates. Anything else is an error, which keeps the
charts within what this script understands.

Usage:
    python3 manifests/render.py            write rendered/ambient-mesh.yaml, rendered/waypoint.yaml
                                           and chart/ambient-mesh/crds/ (copies of crds/)
    python3 manifests/render.py --check    fail if any of those is out of date (the tests run it)
    python3 manifests/render.py waypoint --namespace demo [--set name=reviews-wp]
    python3 manifests/render.py ambient-mesh --set trustDomain=example.org
                                           print one chart, rendered, to stdout

Needs PyYAML (`pip install pyyaml`, Debian's python3-yaml).
"""

import argparse
import json
import re
import sys
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("render.py needs PyYAML: pip install pyyaml (or apt-get install python3-yaml)")

HERE = Path(__file__).resolve().parent
CHARTS = HERE / "chart"
CRDS = HERE / "crds"
RENDERED = HERE / "rendered"
DEFAULT_NAMESPACE = {"ambient-mesh": "mesh-system", "waypoint": "default"}

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class TemplateError(Exception):
    pass


def lookup(values, path, where):
    node = values
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise TemplateError(f"{where}: .Values.{path} is not set")
        node = node[key]
    return node


def scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise TemplateError(f"{value!r} is not a scalar; use toYaml")
    return str(value)


def evaluate(expr, values, namespace, where):
    """The text of one `{{ }}` action that prints something."""
    if expr == ".Release.Namespace":
        return namespace
    m = re.fullmatch(r"\.Values\.([\w.]+)(\s*\|\s*quote)?", expr)
    if m:
        text = scalar(lookup(values, m.group(1), where))
        return json.dumps(text) if m.group(2) else text
    m = re.fullmatch(r"toYaml\s+\.Values\.([\w.]+)\s*\|\s*nindent\s+(\d+)", expr)
    if m:
        value = lookup(values, m.group(1), where)
        dumped = yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")
        pad = " " * int(m.group(2))
        return "\n" + "\n".join(pad + line if line else line for line in dumped.split("\n"))
    raise TemplateError(f"{where}: unsupported template action {{{{ {expr} }}}}")


def render_template(text, values, namespace, where):
    out = []
    # Each entry: is the enclosing block being emitted?
    emitting = [True]
    pos = 0
    trim_next = False
    for m in ACTION.finditer(text):
        chunk = text[pos : m.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if m.group(1):
            chunk = chunk.rstrip()
        if all(emitting):
            out.append(chunk)
        trim_next = bool(m.group(3))
        pos = m.end()
        expr = m.group(2)
        cond = re.fullmatch(r"if\s+\.Values\.([\w.]+)", expr)
        if cond:
            value = lookup(values, cond.group(1), where) if all(emitting) else None
            emitting.append(bool(value))
        elif expr == "end":
            if len(emitting) == 1:
                raise TemplateError(f"{where}: {{{{ end }}}} without {{{{ if }}}}")
            emitting.pop()
        elif all(emitting):
            out.append(evaluate(expr, values, namespace, where))
    if len(emitting) != 1:
        raise TemplateError(f"{where}: {{{{ if }}}} without {{{{ end }}}}")
    chunk = text[pos:]
    out.append(chunk.lstrip() if trim_next else chunk)
    return "".join(out)


def set_value(values, assignment):
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise TemplateError(f"--set {assignment}: expected key=value")
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw) if raw else ""


def chart_values(chart, overrides):
    values = yaml.safe_load((CHARTS / chart / "values.yaml").read_text()) or {}
    for assignment in overrides:
        set_value(values, assignment)
    return values


def documents(text):
    """The non-empty YAML documents of a rendered file, without their separators."""
    docs = re.split(r"^---[ \t]*$\n?", text, flags=re.M)
    return [d.strip("\n") + "\n" for d in docs if d.strip()]


def render_chart(chart, namespace, overrides):
    """A chart's templates, rendered, as a list of (source, document)."""
    values = chart_values(chart, overrides)
    docs = []
    for path in sorted((CHARTS / chart / "templates").glob("*.yaml")):
        where = f"{chart}/templates/{path.name}"
        rendered = render_template(path.read_text(), values, namespace, where)
        docs.extend((where, d) for d in documents(rendered))
    return docs


def crd_files():
    return sorted(CRDS.glob("*.yaml"))


def namespace_document(namespace):
    text = (HERE / "namespace.yaml").read_text()
    return re.sub(r"^  name: .*$", f"  name: {namespace}", text, count=1, flags=re.M)


def render_install(chart, namespace, overrides):
    """What `kubectl apply -f` takes: for ambient-mesh the namespace and the CRDs come first."""
    docs = []
    if chart == "ambient-mesh":
        docs.append(("namespace.yaml", namespace_document(namespace)))
        for path in crd_files():
            docs.extend((f"crds/{path.name}", d) for d in documents(path.read_text()))
    docs.extend(render_chart(chart, namespace, overrides))
    header = (
        f"# Generated by manifests/render.py from manifests/chart/{chart} (namespace {namespace}).\n"
        "# Do not edit: edit the chart and run `python3 manifests/render.py`.\n"
    )
    return header + "".join(f"---\n# Source: {src}\n{doc}" for src, doc in docs)


def outputs():
    """Every generated file: path -> expected content."""
    files = {}
    for path in crd_files():
        files[CHARTS / "ambient-mesh" / "crds" / path.name] = path.read_text()
    for chart in ("ambient-mesh", "waypoint"):
        files[RENDERED / f"{chart}.yaml"] = render_install(chart, DEFAULT_NAMESPACE[chart], [])
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chart", nargs="?", choices=sorted(DEFAULT_NAMESPACE))
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    parser.add_argument("--namespace", help="the namespace to install into")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        if args.chart:
            namespace = args.namespace or DEFAULT_NAMESPACE[args.chart]
            sys.stdout.write(render_install(args.chart, namespace, args.set))
            return 0
        expected = outputs()
        stale_crds = [
            p for p in (CHARTS / "ambient-mesh" / "crds").glob("*.yaml") if p not in expected
        ]
        if args.check:
            stale = [p for p, text in expected.items() if not p.exists() or p.read_text() != text]
            stale += stale_crds
            for path in stale:
                print(f"out of date: {path.relative_to(HERE.parent)}", file=sys.stderr)
            if stale:
                print("run `python3 manifests/render.py` and commit the result", file=sys.stderr)
                return 1
            return 0
        for path in stale_crds:
            path.unlink()
        for path, text in expected.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path.relative_to(HERE.parent)}")
        return 0
    except TemplateError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
