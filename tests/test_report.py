"""streamml.report: leaderboard, nested selection and plot from a tiny MLflow store."""

import mlflow
import numpy as np
import pytest

from streamml.report import load_runs, main, nested_selection, report

HEADS = "streamml.offline.module.HeadLearner"


def log_run(client, experiment_id, name, learner, tuning, held_out, head=None, study=None, parent=None, commit="abc123"):
    tags = {"mlflow.runName": name, "git_commit": commit}
    if study:
        tags.update({"optuna_study": study, "mlflow.parentRunId": parent})
    run = client.create_run(experiment_id, tags=tags)
    rid = run.info.run_id
    client.log_param(rid, "learner._target_", learner)
    if head:
        client.log_param(rid, "learner.head._target_", head)
    for k, (t, h) in enumerate(zip(tuning, held_out)):
        client.log_metric(rid, f"split_tuning_auc.{k}", t)
        client.log_metric(rid, f"split_auc.{k}", h)
    for key, value in {"auc": np.mean(held_out), "auc_std": np.std(held_out, ddof=1), "tuning_auc": np.mean(tuning),
                       "ndcg_at_5": 0.9, "map": 0.95}.items():
        client.log_metric(rid, key, float(value))
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("store")  # one store for the module: creating an MLflow database takes seconds
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    eid = client.create_experiment("nested", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(eid, tags={"mlflow.runName": "study-s", "optuna_study": "s", "streamml.role": "study"}).info.run_id
    client.set_terminated(parent)
    head = "streamml.offline.heads.MultiTaskHeads"
    # Trial a wins the inner folds of split 0, trial b those of split 1; c is best held-out but never chosen.
    log_run(client, eid, "trial-a", HEADS, [0.95, 0.80, 0.90], [0.91, 0.70, 0.93], head, "s", parent)
    log_run(client, eid, "trial-b", HEADS, [0.90, 0.92, 0.91], [0.99, 0.88, 0.92], head, "s", parent)
    log_run(client, eid, "trial-c", HEADS, [0.85, 0.85, 0.85], [0.99, 0.99, 0.99], head, "s", parent)
    log_run(client, eid, "lr-C1", "streamml.offline.baselines.SklearnLR", [0.90, 0.90, 0.90], [0.90, 0.80, 0.90], commit="def456")
    log_run(client, eid, "lr-C10", "streamml.offline.baselines.SklearnLR", [0.91, 0.89, 0.89], [0.85, 0.86, 0.87], commit="def456")
    log_run(client, eid, "river", "streamml.offline.baselines.RiverStack", [0.88, 0.88, 0.88], [0.87, 0.86, 0.85])
    return uri


def test_families_are_studies_or_learner_classes_and_study_parents_are_dropped(store):
    runs = load_runs("nested", store)
    assert sorted(runs["tags.mlflow.runName"]) == ["lr-C1", "lr-C10", "river", "trial-a", "trial-b", "trial-c"]
    family = dict(zip(runs["tags.mlflow.runName"], runs["family"]))
    assert family == {"trial-a": "study s", "trial-b": "study s", "trial-c": "study s",
                      "lr-C1": "SklearnLR", "lr-C10": "SklearnLR", "river": "RiverStack"}
    assert dict(zip(runs["tags.mlflow.runName"], runs["baseline"]))["lr-C1"]


def test_nested_selection_chooses_on_inner_folds_and_reports_the_outer_figure(store):
    chosen = nested_selection(load_runs("nested", store)).set_index(["family", "split"])
    assert [chosen.loc[("study s", k), "run"] for k in range(3)] == ["trial-a", "trial-b", "trial-b"]
    assert [chosen.loc[("study s", k), "auc"] for k in range(3)] == pytest.approx([0.91, 0.88, 0.92])
    assert [chosen.loc[("SklearnLR", k), "run"] for k in range(3)] == ["lr-C10", "lr-C1", "lr-C1"]
    assert [chosen.loc[("SklearnLR", k), "tuning_auc"] for k in range(3)] == pytest.approx([0.91, 0.90, 0.90])
    assert chosen.loc[("study s", 0), "candidates"] == 3


def test_report_writes_markdown_with_header_nested_table_leaderboard_and_plot(store, tmp_path):
    out = tmp_path / "out" / "nested.md"
    text = report("nested", out, store, command="python -m streamml.train -m hparams_search=x")
    assert out.read_text() == text
    assert "- Runs made by: `python -m streamml.train -m hparams_search=x`" in text
    assert "- Runs at commit(s): abc123, def456" in text and "- Machine: " in text
    study_row = next(line for line in text.splitlines() if line.startswith("| study s |"))
    # held-out mean ± std of (0.91, 0.88, 0.92); paired Δ to LR's chosen (0.85, 0.80, 0.90) = (0.06, 0.08, 0.02)
    assert f"**{np.mean([0.91, 0.88, 0.92]):.4f} ± {np.std([0.91, 0.88, 0.92], ddof=1):.4f}**" in study_row
    assert f"{np.mean([0.06, 0.08, 0.02]):.4f} ± {np.std([0.06, 0.08, 0.02], ddof=1):.4f} | yes |" in study_row
    assert "trial-b: 0.9100 / 0.9300" in study_row  # the best trial by mean tuning AUC, with its held-out AUC
    assert "## Leaderboard" in text and "| trial-c | study s | ours | 0.8500 | 0.9900 ± 0.0000 |" in text
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![held-out AUC per family]({png.name})" in text


def test_main_names_its_own_command_and_missing_experiments_are_clear(store, tmp_path, capsys):
    out = tmp_path / "r.md"
    main(["nested", "--out", str(out), "--tracking-uri", store])
    assert f"- Written by: `python -m streamml.report nested --out {out} --tracking-uri {store}`" in out.read_text()
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        main(["nope", "--out", str(out), "--tracking-uri", store])


def test_online_runs_get_one_row_per_learner(store, tmp_path):
    uri = store
    client = mlflow.MlflowClient(uri)
    eid = client.create_experiment("online", artifact_location=str(tmp_path / "artifacts"))
    rid = client.create_run(eid, tags={"mlflow.runName": "coldstart", "git_commit": "abc"}).info.run_id
    client.log_param(rid, "scenario._target_", "streamml.online.simulate.ColdStart")
    for key, value in {"prequential_auc": 0.92, "prequential_auc.river": 0.88, "curve.prequential_auc.river": 0.5}.items():
        client.log_metric(rid, key, value)
    client.set_terminated(rid)
    text = report("online", tmp_path / "online.md", uri)
    assert "| residual | 0.920 |" in text and "| river | 0.880 |" in text


def test_online_tables_show_mean_pm_std_over_users_and_where_filters_runs(store, tmp_path):
    client = mlflow.MlflowClient(store)
    eid = client.create_experiment("online_where", artifact_location=str(tmp_path / "artifacts"))
    for streams, auc in [("test", 0.75), ("tune", 0.99)]:  # the tuning run is newer: without --where it would be shown
        rid = client.create_run(eid, tags={"mlflow.runName": f"personalize-{streams}", "streams": streams}).info.run_id
        client.log_param(rid, "scenario.kind", "personalize")
        for key, value in {"probe_auc_at_5": auc, "probe_auc_at_5_std": 0.25, "probe_auc_at_5.river": 0.66,
                           "probe_auc_at_5_std.river": 0.2, "probe_auc_at_0": 0.7, "probe_auc_at_5_none": 0.9,
                           "probe_gap_at_5": 0.0, "probe_gap_at_5.river": 0.09}.items():
            client.log_metric(rid, key, value)
        client.set_terminated(rid)
    out = tmp_path / "online.md"
    main(["online_where", "--out", str(out), "--tracking-uri", store, "--where", "tags.streams = 'test'",
          "--metrics", "probe_auc_at_0,probe_auc_at_5", "--metrics", "probe_auc_at_5_none"])
    text = out.read_text()
    assert "personalize-test" in text and "0.990" not in text
    assert ("| learner | probe_auc_at_0 | probe_auc_at_5 |\n|---|---|---|\n"
            "| residual | 0.700 | 0.750 ± 0.250 |\n| river |  | 0.660 ± 0.200 |") in text
    assert "| learner | probe_auc_at_5_none |\n|---|---|\n| residual | 0.900 |" in text  # a second table, no std logged
    assert "(1 finished runs)" in text and "_gap" not in text
    main(["online_where", "--out", str(out), "--tracking-uri", store, "--where", "tags.streams = 'test'",
          "--metrics", "probe_auc_at_5,probe_gap_at_5"])
    assert "a `_gap` is residual minus that learner, paired on the same user" in out.read_text()
    with pytest.raises(SystemExit, match="matching \"tags.streams = 'nope'\""):
        main(["online_where", "--out", str(out), "--tracking-uri", store, "--where", "tags.streams = 'nope'"])


def test_results_files_name_a_store_inside_the_repository_and_never_a_path_outside():
    from streamml.report import store_label

    assert store_label("sqlite:///mlflow.db") == "`sqlite:///mlflow.db`"
    assert "/tmp" not in store_label("sqlite:////tmp/x/mlflow.db")


def test_a_sweep_of_online_runs_gets_one_row_per_run_with_exactly_the_chosen_metrics(store, tmp_path):
    text = report("online_where", tmp_path / "sweep.md", store, tables=[["probe_auc_at_5", "probe_auc_at_5.river"]])
    assert "| run | probe_auc_at_5 | probe_auc_at_5.river |\n|---|---|---|\n| personalize-tune | 0.9900 | 0.6600 |" in text
    assert "| personalize-test | 0.7500 | 0.6600 |" in text


def test_an_online_report_gets_a_png_of_auc_against_events_per_kind_of_user(store, tmp_path):
    client = mlflow.MlflowClient(store)
    eid = client.create_experiment("online_png", artifact_location=str(tmp_path / "artifacts"))
    rid = client.create_run(eid, tags={"mlflow.runName": "personalize"}).info.run_id
    client.log_param(rid, "scenario.kind", "personalize")
    for step, value in [(0, 0.7), (5, 0.8), (10, 0.85)]:
        client.log_metric(rid, "curve.probe_auc.residual", value, step=step)
        client.log_metric(rid, "curve.probe_auc.river", value - 0.1, step=step)
    for key, value in {"probe_auc_at_5": 0.8, "probe_auc_at_5_none": 0.9, "probe_auc_at_10_none": 0.88,
                       "probe_auc_at_5_none.river": 0.6, "probe_auc_at_5_std": 0.1, "probe_auc_at_5_none_std": 0.1}.items():
        client.log_metric(rid, key, value)
    client.set_terminated(rid)
    text = report("online_png", tmp_path / "online.md", store)
    assert "![AUC against events, per kind of user, newest run](online.png)" in text
    assert (tmp_path / "online.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from streamml.report import load_runs, online_plot

    fig = online_plot(load_runs("online_png", store).iloc[0], store)
    panels = {ax.get_title(): {line.get_label(): list(line.get_xydata().tolist()) for line in ax.get_lines()} for ax in fig.axes}
    assert panels == {"probe_auc, all users": {"residual": [[0, 0.7], [5, 0.8], [10, 0.85]],
                                               "river": [[0, pytest.approx(0.6)], [5, pytest.approx(0.7)], [10, pytest.approx(0.75)]]},
                      "probe_auc, users: none": {"residual": [[5, 0.9], [10, 0.88]], "river": [[5, 0.6]]}}


def test_a_long_run_name_is_wrapped_over_the_online_plot_not_cut(store, tmp_path):
    client = mlflow.MlflowClient(store)
    eid = client.create_experiment("online_long", artifact_location=str(tmp_path / "artifacts"))
    name = "coldstart-test-MixedLearner-k48-factorsals-trustTrue-gateFalse-prior_var5.0-covariancediagonal-bias_var0.0"
    rid = client.create_run(eid, tags={"mlflow.runName": name}).info.run_id
    for step, value in [(10, 0.8), (15, 0.85)]:
        client.log_metric(rid, "curve.prequential_auc.mixed", value, step=step)
    client.set_terminated(rid)
    from streamml.report import load_runs, online_plot

    fig = online_plot(load_runs("online_long", store).iloc[0], store)
    title = fig._suptitle.get_text()
    assert title.replace("\n", "") == name and "\n" in title
    fig.canvas.draw()  # every line of the title lies within the figure
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
