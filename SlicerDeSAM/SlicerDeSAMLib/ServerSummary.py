"""What Test connection shows: the service's model, device, decoders and cache, as
display-ready strings, with the raw answers beside them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServerSummary"]


def _bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ServerSummary:
    """``model``: e.g. "mobile_sam (weights sam-mobile, sha256 1a2b3c4d5e6f)"; ``device``:
    e.g. "cuda, bf16"; ``decoders``: the trained decoders served ("liver v3 (registry);
    phantom (file)"), or "none (...)"; ``decoder_names``: the names a request's ``decoder`` takes;
    ``structures``: the structures they segment; ``cache``: feature cache per tier;
    ``training``: training jobs running or queued. ``info``, ``decoders_raw``,
    ``registry``: the service's answers (GET /info, /decoders, /registry)."""

    url: str
    version: str
    model: str
    device: str
    decoders: str
    decoder_names: tuple[str, ...]
    structures: tuple[str, ...]
    cache: str
    training: str
    auth: bool
    info: dict = field(repr=False)
    decoders_raw: tuple[dict, ...] = field(repr=False)
    registry: tuple[dict, ...] = field(repr=False)

    @classmethod
    def from_answers(cls, url: str, info: dict, registry: list[dict]) -> ServerSummary:
        model = info.get("model", {})
        sha = model.get("encoder_weights_sha256")
        weights = f"weights {model.get('weights')}" + (f", sha256 {sha[:12]}" if sha else "")
        decoders = list(info.get("decoders", []))
        lines, names, structures = [], [], []
        for d in decoders:
            version = f" {d['version']}" if d.get("version") else ""
            structure = d.get("structure") or d["name"]
            about = "" if structure == d["name"] else f", structure {structure}"
            lines.append(f"{d['name']}{version} ({d.get('source', 'file')}{about})")
            names.append(d["name"])
            if structure not in structures:
                structures.append(structure)
        tiers = info.get("cache", {}).get("tiers", {})
        cache = "; ".join(f"{name} {t['entries']} slices, {_bytes(t['bytes_used'])} of {_bytes(t['byte_budget'])}"
                          for name, t in tiers.items() if t.get("enabled")) or "off"
        training = info.get("training", {})
        running, queued = training.get("running", 0), training.get("queued", 0)
        training_text = (f"{running} running, {queued} queued" if running or queued else "none running")
        return cls(url=url, version=str(info.get("version", "?")),
                   model=f"{model.get('encoder', '?')} ({weights})",
                   device=f"{model.get('device', '?')}, {model.get('precision', '?')}",
                   decoders="; ".join(lines) or "none (train one in the Train panel)",
                   decoder_names=tuple(names), structures=tuple(structures), cache=cache,
                   training=training_text, auth=bool(info.get("settings", {}).get("auth")), info=info,
                   decoders_raw=tuple(decoders), registry=tuple(registry))

    def lines(self) -> list[str]:
        """The summary as label lines for the Server panel."""
        return [f"Service {self.version} at {self.url}", f"Model: {self.model}", f"Device: {self.device}",
                f"Decoders: {self.decoders}", f"Feature cache: {self.cache}", f"Training: {self.training}"]
