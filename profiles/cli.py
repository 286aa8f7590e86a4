"""``splitedge profiles list|show``, and the ``--profile`` parameter type edge-train and flash-board share."""

from __future__ import annotations

import json
import sys

import click

from .schema import GRAPHS, Profile, ProfileError, load, shipped


class ProfileParam(click.ParamType):
    """``--profile NAME|PATH``: a shipped profile's name or a profile file; validated (exit 2 on errors).

    ``as_string=True`` keeps the value as given (for configs that store the name/path),
    after checking that it loads.
    """

    name = "NAME|PATH"

    def __init__(self, as_string: bool = False):
        self.as_string = as_string

    def convert(self, value, param, ctx):
        if isinstance(value, Profile):
            return value
        try:
            profile = load(value)
        except ProfileError as e:
            self.fail(str(e), param, ctx)
        return str(value) if self.as_string else profile


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def profiles() -> None:
    """Device profiles: execution providers and settings per board (profiles/*.toml)."""


@profiles.command("list")
def list_cmd() -> None:
    """The shipped profiles, one a line: name, architecture, providers, ORT build, description."""
    rows = []
    for name in shipped():
        p = load(name)
        fwd = ">".join(_short(x) for x in p.forward)
        trn = ">".join(_short(x) for x in p.training)
        rows.append((p.name, p.board.arch, f"py{p.board.python}", f"forward {fwd}", f"training {trn}",
                     f"ORT {p.ort.version} ({p.ort.source})", p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


@profiles.command("show")
@click.argument("profile", type=ProfileParam())
@click.option("--json", "as_json", is_flag=True, help="The validated profile as JSON instead of the file.")
@click.option("--here", is_flag=True,
              help="Also select providers against the ONNX Runtime of this machine (imports onnxruntime).")
def show_cmd(profile: Profile, as_json: bool, here: bool) -> None:
    """Print PROFILE (a shipped name or a file path), validated: the file itself, or --json."""
    if as_json:
        d = profile.to_dict()
        d["path"] = profile.path
        d["backend"] = profile.backend
        if here:
            d["here"] = _here(profile)
        click.echo(json.dumps(d, indent=2))
        return
    with open(profile.path, encoding="utf-8") as f:
        text = f.read()
    click.echo(f"# {profile.path}")
    click.echo(text.rstrip("\n"))
    click.echo(f"\n# edge backend: {profile.backend} ({profile.ort.package} {profile.ort.version}; "
               + ("ORT's training build, which imports torch)" if profile.backend == "ort-training"
                  else "plain ONNX Runtime: the portable backend's graphs, no torch)"))
    if profile.stacks:
        click.echo("")
        for line in stacks_summary(profile):
            click.echo(f"# {line}" if line else "#")
    if here:
        h = _here(profile)
        click.echo(f"\n# on this machine ONNX Runtime reports: {', '.join(h['available'])}")
        click.echo(f"# {h['sentence']}")


def stacks_summary(profile: Profile) -> list[str]:
    """The ``[[stack]]`` entries in words: packages, which graph runs where, whether the
    accelerator path can train, and whether splitedge's edge runtime can use the stack as is."""
    out = [f"runtime stacks of {profile.name} (the portable graphs: inference, forward, backward; plain ONNX, "
           "opset 13):"]
    for st in profile.stacks:
        out.append("")
        state = "usable by splitedge" if st.usable else "NOT usable by splitedge as is"
        out.append(f"{st.name}: {st.os}; Python {st.python}; {state}")
        out += [f"  package: {pkg}" for pkg in st.packages]
        out += [f"  system:  {sys_}" for sys_ in st.system]
        out.append(f"  graphs:  {st.placement}")
        for place in dict.fromkeys(getattr(st, g) for g in GRAPHS):
            if place == "CPU":
                continue
            graphs = [g for g in GRAPHS if getattr(st, g) == place]
            if graphs == ["inference"]:
                out.append(f"  {place}: the inference graph only")
            else:
                out.append(f"  {place}: the {' and '.join(graphs)} graph{'s' if len(graphs) > 1 else ''}"
                           + ("; trains on the accelerator" if set(graphs) >= {"forward", "backward"} else ""))
        if st.accelerated and not st.trains_on_accelerator:
            out.append("  this accelerator path cannot train: training (forward, backward) runs on the CPU")
        elif not st.accelerated:
            out.append("  training (forward, backward) runs on the CPU")
        out.append(f"  why:     {st.why}")
        out.append(f"  tested:  {st.tested or 'not tested'}")
    usable = [st for st in profile.stacks if st.usable]
    out.append("")
    if not usable:
        out.append(f"{profile.name}: no stack is usable by splitedge's edge runtime as is")
    else:
        where = sorted({st.forward for st in usable} | {st.backward for st in usable})
        accel = [st.name for st in usable if st.trains_on_accelerator]
        out.append(f"{profile.name}: splitedge trains on {' or '.join(where)} here (usable stacks: "
                   f"{', '.join(st.name for st in usable)})"
                   + ("" if accel else "; no usable stack trains on an accelerator"))
    return out


def _short(p: str) -> str:
    from .select import short_name

    return short_name(p)


def _here(profile: Profile) -> dict:
    from ..runtime_edge.ort_backend import available_providers
    from .select import select_providers

    avail = available_providers()
    return {"available": avail, **select_providers(profile, avail).to_dict()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(profiles())
