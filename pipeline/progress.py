"""One progress bar for every long job: count, rate (items/s), ETA and a free-text field (loss...)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:8.1f} {self.unit}/s" if speed else f"{'-':>8} {self.unit}/s")


class Bar:
    """`with Bar(enabled, total, "desc") as bar: bar.advance(n, info="loss 1.23")`; silent when disabled."""

    def __init__(self, enabled: bool, total: int | None, desc: str, unit: str = "img"):
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit

    def __enter__(self) -> Bar:
        if self.enabled:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     _Rate(self.unit), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.progress.__enter__()
            self.task = self.progress.add_task(self.desc, total=self.total, info="")
        return self

    def advance(self, n: int, info: str | None = None) -> None:
        if self.enabled:
            kw = {"info": info} if info is not None else {}
            self.progress.update(self.task, advance=n, **kw)

    def __exit__(self, *exc) -> bool:
        if self.enabled:
            self.progress.__exit__(*exc)
        return False
