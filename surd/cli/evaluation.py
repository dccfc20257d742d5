"""`surd eval`: the SUR-adapter against the base model on SURD's test split and the probe sets."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from surd.errors import SurdError


def _csv(value: str, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SurdError(f"{flag} {value!r}: expected a comma-separated list")
    return items


def _seeds(value: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(v) for v in _csv(value, "--seeds")))
    except ValueError:
        raise SurdError(f"--seeds {value!r}: expected integers, e.g. 0,1") from None


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        base: str = typer.Option(..., "--base", help="diffusers SD folder, hub id, or one .safetensors/.ckpt file"),
        base_config: str | None = typer.Option(None, "--base-config", help="single-file --base: its configs' folder"),
        adapter: Path = typer.Option(..., "--adapter", help="`surd train` run folder"),
        out: Path = typer.Option(..., "--out", "-o", help="evaluation folder (created; rerun to resume)"),
        clip: str = typer.Option(..., "--clip", help="open_clip folder, or NAME/PRETRAINED (e.g. ViT-L-14/openai)"),
        data: Path | None = typer.Option(None, "--data", help="run folder with an exported dataset (DIR/surd)"),
        probes: str = typer.Option("counting,colour,action", "--probes",
                                   help="probe sets (shipped names or YAML files), comma-separated; 'none' for none"),
        limit: int | None = typer.Option(None, "--limit", min=1, help="at most N prompts per prompt set"),
        seeds: str = typer.Option("0,1", "--seeds", help="seeds, comma-separated; every arm uses the same ones"),
        steps: int = typer.Option(30, "--steps", min=1, help="inference steps"),
        guidance: float = typer.Option(7.5, "--guidance", min=0.0, help="classifier-free guidance scale"),
        negative_prompt: str = typer.Option("", "--negative-prompt", help="negative prompt for every arm"),
        size: int | None = typer.Option(None, "--size", min=8, help="image side in pixels (default: the model's)"),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="images per pipeline call"),
        device: str | None = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda when available)"),
        llm: str | None = typer.Option(None, "--llm", help="control: base model on prompts expanded by this LLM"),
        llm_url: str | None = typer.Option(None, "--llm-url", help="OpenAI-compatible base URL serving --llm"),
        finetune: str | None = typer.Option(None, "--finetune", help="control: a plain fine-tune (diffusers model)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ) -> None:
        """Generate with the base model and the adapter from the same seeds; CLIP scores, probe accuracy, reports."""
        from adapter.config import EvalConfig
        from adapter.evaluate import run_eval

        try:
            config = EvalConfig(
                base=base, base_config=base_config, adapter=adapter, clip=clip, data=data,
                probes=[] if probes.strip().lower() == "none" else _csv(probes, "--probes"),
                limit=limit, seeds=_seeds(seeds), steps=steps, guidance_scale=guidance,
                negative_prompt=negative_prompt, height=size, width=size, batch_size=batch_size, device=device,
                llm=llm, llm_url=llm_url, finetune=finetune,
            )
        except ValidationError as e:
            error = e.errors()[0]
            raise SurdError(f"eval option {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
        results = run_eval(config, out, progress=not quiet)
        images = results["images"]
        typer.echo(f"{images['total']} images ({images['generated']} generated, {images['reused']} reused)")
        typer.echo((out / "results.md").read_text())
        typer.echo(f"report: {out / 'report.html'}")
