"""Run a Kubeflow Trainer ``TrainJob`` through the Kubernetes API: create it, follow it, clean up.

:func:`run_trainjob` creates the job (or finds the one an earlier attempt created: the name
depends on the run key only), then polls it: each change of its conditions, its replicated
jobs' counts and its pods' phases becomes a log line, and so does every new line of the pods'
logs (container ``node``, prefixed with the pod's name), so that the launcher's task log in the
KFP UI shows the training as it runs. It returns when the ``Complete`` condition is true, and
raises :class:`TrainJobFailed` with the job's own reason and message when ``Failed`` is. The
finished job is deleted or kept as asked. The manifest comes from
:func:`toptagger.deploy.trainjob.render.render`.

The API calls are the ``kubernetes`` client's (``CustomObjectsApi`` for TrainJobs, ``CoreV1Api``
for pods and logs); the tests run them against a fake API server on loopback.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toptagger.deploy.trainjob.render import GROUP, NODE, PLURAL, VERSION
from toptagger.errors import ConfigError, TaggerError

JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet labels each pod with its TrainJob's name
ROLE = "top-tagger-trainer"  # manifests/base/trainer-rbac.yaml
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
log = logging.getLogger(__name__)


class TrainJobFailed(TaggerError, RuntimeError):
    """The TrainJob failed (its reason and message), or the API refused it."""


class TrainJobEnded(TrainJobFailed):
    """The TrainJob itself ended with its Failed condition (what ``keep`` is about)."""


def api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``kubernetes`` ApiClient: in-cluster credentials in a pod, else the kubeconfig."""
    from kubernetes import client, config

    try:
        if kubeconfig is None and context is None and SA_NAMESPACE.is_file():
            config.load_incluster_config()
            return client.ApiClient()
        # $KUBECONFIG read now: the client reads it once, when it is first imported.
        return config.new_client_from_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), context=context)
    except (config.ConfigException, OSError) as exc:
        raise ConfigError(f"no usable Kubernetes configuration ({exc}); set KUBECONFIG or pass --kubeconfig") from None


def current_namespace(default: str = "default") -> str:
    """The pod's own namespace (its ServiceAccount's), else ``default``."""
    try:
        return SA_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def _api_error(action: str, exc: Any) -> TrainJobFailed:
    import json

    status = getattr(exc, "status", None)
    try:
        detail = json.loads(exc.body).get("message") or exc.body
    except (TypeError, ValueError, AttributeError):
        detail = getattr(exc, "body", None) or str(exc)
    if status in (401, 403):
        return TrainJobFailed(
            f"{action}: not allowed ({status}); bind the {ROLE} Role to the pipeline's ServiceAccount "
            f"(manifests/base/trainer-rbac.yaml): {detail}"
        )
    if status == 404 and "the server could not find the requested resource" in str(detail):
        return TrainJobFailed(f"{action}: the API has no TrainJobs; is Kubeflow Trainer v2.3 installed? ({detail})")
    return TrainJobFailed(f"{action}: {status} {detail}")


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and str(condition.get("status")).lower() == "true":
            return condition
    return None


class TrainJobWatch:
    """One TrainJob through the API: create, read, follow, delete."""

    def __init__(self, client: Any, name: str, namespace: str, emit: Callable[[str], None] = log.info) -> None:
        from kubernetes import client as k8s

        self.custom, self.core = k8s.CustomObjectsApi(client), k8s.CoreV1Api(client)
        self.name, self.namespace, self.emit = name, namespace, emit
        self.where = f"TrainJob {namespace}/{name}"
        self._said: set[str] = set()
        self._phases: dict[str, str] = {}
        self._last_line: dict[str, str] = {}  # pod -> timestamp of its last printed log line
        self._fetched: dict[str, float] = {}  # pod -> when its log was last read (time.monotonic)

    def get(self) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        except ApiException as exc:
            if exc.status == 404 and "could not find the requested resource" not in str(exc.body):
                return None
            raise _api_error(f"reading {self.where}", exc) from None

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
        except ApiException as exc:
            raise _api_error(f"creating {self.where}", exc) from None

    def delete(self, wait_s: float = 120, poll_s: float = 2) -> None:
        """Delete the job (its JobSet and pods follow by garbage collection) and wait until it is gone."""
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body={"propagationPolicy": "Background"}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(f"deleting {self.where}", exc) from None
        deadline = time.monotonic() + wait_s
        while self.get() is not None:
            if time.monotonic() > deadline:
                raise TrainJobFailed(f"{self.where} still exists {wait_s:.0f} s after its deletion")
            time.sleep(poll_s)

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self.emit(line)

    def report(self, job: dict[str, Any]) -> None:
        """Log what changed: conditions, replicated jobs' counts, pods' phases, new log lines."""
        status = job.get("status") or {}
        for c in status.get("conditions") or []:
            reason = f"{c.get('reason', '')}: {c.get('message', '')}"
            self._say(f"{self.where}: {c.get('type')}={c.get('status')} ({reason})")
        for j in status.get("jobsStatus") or []:
            counts = ", ".join(f"{key} {j.get(key, 0)}" for key in ("active", "ready", "succeeded", "failed"))
            self._say(f"{self.where}: job {j.get('name')}: {counts}")
        self._follow_pods()

    def _follow_pods(self) -> None:
        from kubernetes.client.rest import ApiException

        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={self.name}").items
        except ApiException as exc:
            raise _api_error(f"listing the pods of {self.where}", exc) from None
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            name, phase = pod.metadata.name, pod.status.phase or "Unknown"
            if self._phases.get(name) != phase:
                self._phases[name] = phase
                self.emit(f"pod {name}: {phase}{_waiting_reason(pod)}")
            if phase in ("Running", "Succeeded", "Failed"):
                self._print_log(name)

    def _print_log(self, pod: str) -> None:
        from kubernetes.client.rest import ApiException

        options: dict[str, Any] = {"container": NODE, "timestamps": True}
        if pod in self._fetched:  # only the recent part (with a margin; repeated lines are skipped below)
            options["since_seconds"] = int(time.monotonic() - self._fetched[pod]) + 30
        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, **options)
            self._fetched[pod] = time.monotonic()
        except ApiException as exc:
            if exc.status in (401, 403):
                raise _api_error(f"reading the log of pod {pod}", exc) from None
            return  # the container is not started yet, or already gone: the next poll tries again
        last = self._last_line.get(pod, "")
        for line in text.splitlines():
            stamp, _, message = line.partition(" ")
            if stamp > last:  # RFC 3339 timestamps of one format sort as text
                self.emit(f"[{pod}] {message}")
                last = stamp
        self._last_line[pod] = last


def _waiting_reason(pod: Any) -> str:
    for container in pod.status.container_statuses or []:
        waiting = container.state and container.state.waiting
        if waiting and waiting.reason:
            return f" ({waiting.reason}: {waiting.message or ''})"
    for condition in pod.status.conditions or []:
        if condition.status == "False" and condition.reason:
            return f" ({condition.reason}: {condition.message or ''})"
    return ""


def run_trainjob(
    manifest: dict[str, Any],
    client: Any,
    *,
    keep: str = "on-failure",
    poll_s: float = 10,
    emit: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Create ``manifest`` (or follow the job of the same name), wait until it ends; returns the finished job.

    A job left by an earlier attempt is followed if it is running or complete, and replaced if it
    failed (its checkpoint makes the new one resume). ``keep``: ``never`` deletes the finished
    job, ``on-failure`` deletes it only if it completed, ``always`` keeps it. A stopped wait
    (``KeyboardInterrupt``, e.g. the KFP run was terminated) deletes the job unless ``always``.
    """
    meta = manifest["metadata"]
    watch = TrainJobWatch(client, meta["name"], meta.get("namespace") or current_namespace(), emit)
    job = watch.get()
    if job is not None and _condition(job, "Failed"):
        emit(f"{watch.where} of an earlier attempt failed: replacing it (training resumes its checkpoint)")
        watch.delete(poll_s=poll_s)
        job = None
    if job is None:
        job = watch.create({**manifest, "metadata": {**meta, "namespace": watch.namespace}})
        emit(f"created {watch.where}")
    else:
        emit(f"{watch.where} exists (an earlier attempt created it): following it")
    try:
        job = _follow(watch, job, poll_s)
    except KeyboardInterrupt:  # the run was stopped (the launcher turns SIGTERM into this)
        if keep != "always":
            emit(f"stopped: deleting {watch.where}")
            watch.delete(poll_s=poll_s)
        raise
    except TrainJobEnded:
        if keep == "never":
            watch.delete(poll_s=poll_s)
        else:
            emit(f"kept {watch.where} (kubectl -n {watch.namespace} describe trainjob {watch.name})")
        raise
    if keep == "always":
        emit(f"kept {watch.where}")
    else:
        watch.delete(poll_s=poll_s)
    return job


def _follow(watch: TrainJobWatch, job: dict[str, Any], poll_s: float) -> dict[str, Any]:
    while True:
        watch.report(job)  # before the verdict, so that the last log lines are printed
        if _condition(job, "Complete"):
            watch.emit(f"{watch.where} complete")
            return job
        failed = _condition(job, "Failed")
        if failed:
            reason, message = failed.get("reason") or "Failed", failed.get("message") or ""
            raise TrainJobEnded(f"{watch.where} failed: {reason}" + (f": {message}" if message else ""))
        time.sleep(poll_s)
        found = watch.get()
        if found is None:
            raise TrainJobFailed(f"{watch.where} was deleted before it finished")
        job = found
