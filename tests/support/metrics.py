"""The service's Prometheus endpoint as a plain HTTP client sees it, parsed by
prometheus_client's parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(address: object) -> Samples:
    """Every sample of the metrics endpoint at `address` (host:port): name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        amount
        for found, amount in samples.get(name, [])
        if all(found.get(key) == wanted for key, wanted in labels.items())
    )


def health_code(address: tuple[str, int]) -> int:
    """What the metrics endpoint's /health at `address` answers: 200 or 503, 0 when it
    cannot be asked (nothing listens, or the connection is refused)."""
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/health", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def alert_rules() -> str:
    """The Prometheus rules of docs/deployment.md, "What to alert on", as YAML."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    return text.split("## What to alert on", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
