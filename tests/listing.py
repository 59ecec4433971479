"""Every stored job of a queue, across pages."""

from __future__ import annotations

from jobbroker import Client, Job, JobState


def all_jobs(client: Client, queue: str, states: list[JobState] | None = None) -> dict[str, Job]:
    found: dict[str, Job] = {}
    token: str | None = None
    while True:
        page = client.list_jobs(queue=queue, states=states, page_size=1000, page_token=token)
        found.update((job.id, job) for job in page.jobs)
        token = page.next_page_token
        if token is None:
            return found
