"""Promotion: move the registry alias ``champion`` to a challenger that off-policy evaluation says is better.

``python -m streamml.loop promote log=exports/events challenger=<run id | model URI>`` (``configs/loop/promote.yaml``)
runs :func:`streamml.loop.evaluate.evaluate` and promotes only when the challenger's lower
confidence bound beats the champion's estimate (``estimator``, DR by default): a challenger
that is merely not worse, or better by less than the noise of the held-out slice, stays out.

Promoting: the current champion's version gets the alias ``previous``; a challenger given as
a run (``<run id>``, ``runs:/<id>/model``) is registered as a new version of ``name``
(:func:`streamml.register.register`), a version of another registered model is copied in as
one; then ``champion`` moves to it. A service serving ``models:/streamml@champion`` follows
(``reload.follow_alias_s``). If the alias moved while the evaluation ran, nothing is promoted.
``python -m streamml.loop rollback`` swaps ``champion`` and ``previous`` back: one command.

**Exit codes.** ``promote`` exits 0 when it promoted and **3** when it did not (the one line
says why, with both figures); 1 is an error (a missing log, an unknown run). "Not promoted" is a
decision, not a failure, but a script must tell it apart: ``promote && deploy`` deploys only a
promotion, and a cron job that must not alert on a refusal tests ``[ $? -eq 3 ]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamml.loop.evaluate import Evaluation, evaluate

__all__ = ["Decision", "NOT_PROMOTED", "decide", "promote", "rollback"]

NOT_PROMOTED = 3  # the exit code of a refusal


@dataclass
class Decision:
    promoted: bool
    message: str  # one line: what was done, or why not, with both figures
    evaluation: Evaluation
    version: str | None = None  # the champion's version after the decision
    previous: str | None = None  # the version it replaced (promoted only)


def decide(evaluation: Evaluation) -> tuple[bool, str]:
    """``(promote?, one line with both figures)``: the challenger's lower bound must beat the champion's estimate."""
    r = evaluation.row()
    pct = f"{100 * evaluation.level:g}%"
    figures = (f"challenger {r['challenger']:.3f} (lower {pct} bound {r['challenger_low']:.3f}) vs champion "
               f"{r['champion']:.3f} accepts per slate ({evaluation.estimator}, {evaluation.n_slates} held-out slates)")
    if r["challenger_low"] > r["champion"]:
        return True, figures
    return False, f"not promoted: the challenger's lower bound does not beat the champion's estimate: {figures}"


def _client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _registered_version(client, uri: str, name: str) -> str | None:
    """The version of ``name`` that a ``models:/`` challenger is (a version of another model is copied in as one);
    None for a run, which is registered only once it is promoted."""
    from streamml.serve.model import parse_alias

    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        if path.strip("/") != "model":
            raise ValueError(f"{uri}: a run's model is runs:/<id>/model, the one python -m streamml.train logs")
        return None
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: promote takes a run id, runs:/<id>/model or a registered model (models:/...)")
    parsed = parse_alias(uri)
    other, ref = parsed if parsed else uri[len("models:/"):].rstrip("/").rsplit("/", 1)
    mv = client.get_model_version_by_alias(other, ref) if parsed else client.get_model_version(other, ref)
    if other == name:
        return str(mv.version)
    return str(client.create_model_version(name, mv.source, run_id=mv.run_id).version)


def promote(log, challenger: str, name: str = "streamml", alias: str = "champion", previous_alias: str = "previous",
            tracking_uri: str | None = None, **evaluate_kwargs) -> Decision:
    """Evaluate ``challenger`` against ``models:/<name>@<alias>`` on ``log`` and move ``alias`` if it is better.

    ``evaluate_kwargs`` go to :func:`streamml.loop.evaluate.evaluate` (``items_dir``, ``holdout``,
    ``estimator``, ``policy``, ``experiment``, ``out``, ...).
    """
    from streamml.register import tracking_uri_default

    tracking_uri = tracking_uri or tracking_uri_default()
    evaluation = evaluate(log, challenger, f"models:/{name}@{alias}", tracking_uri=tracking_uri, **evaluate_kwargs)
    champion = evaluation.champion.rsplit("/", 1)[-1]
    ok, figures = decide(evaluation)
    if not ok:
        return Decision(False, figures, evaluation, champion)
    client = _client(tracking_uri)
    now = str(client.get_model_version_by_alias(name, alias).version)
    if now != champion:
        return Decision(False, f"not promoted: {alias} moved from version {champion} to {now} during the evaluation; "
                               "evaluate again", evaluation, now)
    uri = evaluation.challenger  # the challenger as evaluated (an alias resolved to its version)
    version = _registered_version(client, uri, name)
    if version == champion:
        return Decision(False, f"not promoted: the challenger is the champion (version {version})", evaluation, version)
    client.set_registered_model_alias(name, previous_alias, champion)  # first: a crash here leaves the champion as is
    if version is None:  # a run: registered as a new version, which gets the alias
        from streamml.register import register

        version = register(uri.split("/")[1], name, alias, tracking_uri=tracking_uri)[0]
    else:
        client.set_registered_model_alias(name, alias, version)
    if evaluation.run_id:
        client.set_tag(evaluation.run_id, "promoted", f"{name} version {version}")
    message = f"promoted: {name}@{alias} -> version {version} (was {champion}, now @{previous_alias}): {figures}"
    return Decision(True, message, evaluation, version, champion)


def rollback(name: str = "streamml", alias: str = "champion", previous_alias: str = "previous",
             tracking_uri: str | None = None) -> tuple[str, str]:
    """Swap ``alias`` and ``previous_alias``: undo the last promotion. Returns ``(champion, previous)`` versions now."""
    from mlflow.exceptions import MlflowException

    from streamml.register import _check_store, tracking_uri_default

    tracking_uri = tracking_uri or tracking_uri_default()
    _check_store(tracking_uri)
    client = _client(tracking_uri)
    try:
        champion = str(client.get_model_version_by_alias(name, alias).version)
        previous = str(client.get_model_version_by_alias(name, previous_alias).version)
    except MlflowException:
        raise LookupError(f"nothing to roll back to: {name} needs both aliases @{alias} and @{previous_alias} "
                          f"in the registry at {tracking_uri}") from None
    client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_alias(name, previous_alias, champion)
    return previous, champion
