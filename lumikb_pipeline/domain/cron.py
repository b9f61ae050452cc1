"""Cron expressions (UTC) of the drift-check schedule: validation and the next and latest due times."""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import CroniterBadCronError, croniter

from lumikb_pipeline.core.errors import UsageError

CRON_HELP = (
    "write five fields 'minute hour day-of-month month day-of-week' (UTC), "
    "e.g. '0 2 * * *' for daily at 02:00 or '*/15 * * * *' for every 15 minutes"
)



def validate_cron(cron: str) -> str:
    """The cron, normalised; UsageError (exit 2) with the accepted form when it is not one."""
    text = " ".join(cron.split())
    if len(text.split(" ")) != 5:
        raise UsageError(f"{cron!r} is not a cron expression: {CRON_HELP}")
    try:
        if not croniter.is_valid(text):
            raise ValueError(text)
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterBadCronError, ValueError, KeyError) as exc:
        raise UsageError(f"{cron!r} is not a cron expression: {CRON_HELP}") from exc
    return text


def next_cron_time(cron: str, after: datetime) -> datetime:
    """The first time of `cron` (UTC) strictly after `after`."""
    return croniter(cron, after.astimezone(UTC)).get_next(datetime).astimezone(UTC)
