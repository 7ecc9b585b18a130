"""`benchmarks.segment_cost`: the synthetic CT, the stage timers, the patches it restores, and one tiny
`imaging-meta segment` command timed end to end (with test-time adaptation)."""

import mmap
import time

import numpy as np
import pytest

import imaging_meta.adaptation as adaptation
import imaging_meta.commands.segment as seg
from benchmarks import segment_cost as sc
from benchmarks.common import BenchOptions
from imaging_meta.volume.segmenter import ScanSegmenter


def test_synthetic_ct_is_int16_hounsfield_with_the_structure_on_some_slices():
    image, label = sc.synthetic_ct((64, 48, 30), (6.25, 8.0, 10.0), seed=1)
    assert image.shape == label.shape == (64, 48, 30) and image.dtype == np.int16 and label.dtype == np.uint8
    assert image.min() < -900 and 30 < np.median(image[label == 1]) < 70  # air, and the structure's HU
    present = (label == 1).any(axis=(0, 1))
    assert 0 < present.sum() < 30  # the structure shows on some slices only: the negative-slice gate has work
    other, _ = sc.synthetic_ct((64, 48, 30), (6.25, 8.0, 10.0), seed=2)
    assert not np.array_equal(image, other)


def test_stage_timer_charges_nested_stages_exclusively_and_keeps_inclusive_peaks():
    timer = sc.StageTimer()
    with timer.stage("outer"):
        time.sleep(0.02)
        with timer.stage("inner"):
            assert timer.inside("outer") and timer.inside("inner")
            time.sleep(0.03)
    assert not timer.inside("outer")
    assert 0.015 < timer.exclusive["outer"] < 0.03 and timer.exclusive["inner"] >= 0.029
    assert timer.calls["outer"][0] >= timer.exclusive["outer"] + timer.exclusive["inner"] - 1e-6
    marks = sc.Watermarks()
    if not marks.rss:
        pytest.skip("no VmHWM reset on this system")
    timer = sc.StageTimer(marks=marks)
    with timer.stage("outer"):
        with timer.stage("inner"):
            # 64 MiB of fresh anonymous pages, touched (an allocator could serve a numpy array from memory that is
            # already resident late in a long test session, and the peak would not move)
            with mmap.mmap(-1, 64 * 2**20) as big:
                big.write(b"\x01" * (64 * 2**20))
        with timer.stage("after"):
            pass
    assert timer.peak_rss["outer"] >= timer.peak_rss["inner"] >= timer.peak_rss["after"] + 48
    assert timer.overall()[0] >= timer.peak_rss["outer"]


def test_instrumented_restores_what_it_patches():
    before = (seg.volume_transforms, seg._segmenter, seg.save_nifti, seg.keep_components, seg.to_source_grid,
              ScanSegmenter.fit, ScanSegmenter.predict, adaptation.adapt, adaptation.AdaptationEpisodes.batch)
    with sc.instrumented(sc.StageTimer()):
        assert seg.save_nifti is not before[2] and seg.to_source_grid is not before[4]
    after = (seg.volume_transforms, seg._segmenter, seg.save_nifti, seg.keep_components, seg.to_source_grid,
             ScanSegmenter.fit, ScanSegmenter.predict, adaptation.adapt, adaptation.AdaptationEpisodes.batch)
    assert all(a is b for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_one_tiny_segment_command_is_timed_end_to_end(tmp_path):
    scans = sc.write_scans(tmp_path, (48, 48, 16))
    ckpt = sc.write_checkpoint(tmp_path / "demo.ckpt", "demo")
    res = sc.segment_case(scans, str(ckpt), str(tmp_path / "out"), adapt_steps=1, device="cpu")
    assert res["rc"] == 0 and (tmp_path / "out" / "query.nii.gz").exists()
    assert res["query_slices"] == 16 and res["chunk_ms"] and res["predict_s"] > 0
    stages = res["stages"]
    assert set(stages) <= set(sc.STAGES)
    for stage in (sc.LOAD, sc.ENC_QUERY, sc.ENC_SUPPORT, sc.LEARNER, sc.FUSION, sc.INVERT, sc.WRITE, sc.ADAPT, sc.ADAPT_SP):
        assert stages[stage] > 0, stage
    assert sum(stages.values()) == pytest.approx(res["seconds"]) and stages[sc.OTHER] >= -1e-6
    assert sum(res["stages_cpu"].values()) == pytest.approx(res["cpu_seconds"]) and res["stages_cpu"][sc.LEARNER] > 0
    assert res["peak_rss_mib"] > res["rss_rise_mib"] > 0 and res["cuda_peak_mib"] is None and res["cpu_seconds"] > 0
    assert 0 < res["stage_rss_mib"][sc.LOAD] <= res["peak_rss_mib"] + 1e-6
    # the tables
    cost, profile = sc._sections(BenchOptions(), (48, 48, 16), 1, [sc._summary("case", [res])], ["case"], [[res]], [], [])
    assert cost.rows[0][0] == "case" and cost.rows[0][4] == pytest.approx(16 / res["seconds"])
    assert len(profile.headers) == 5 and all(len(row) == 5 for row in profile.rows)
    # the CPU shares add up (stages under 0.5 ms of wall time are left out of the table)
    assert sum(row[3] for row in profile.rows[:-1]) == pytest.approx(100.0, abs=0.5)
    assert profile.rows[-1][0].startswith("total") and "where the time goes" in profile.title


def test_tables_with_cuda_columns():
    res = {"seconds": 10.0, "cpu_seconds": 8.0, "stages": {sc.LOAD: 4.0, sc.LEARNER: 5.0, sc.OTHER: 1.0},
           "stages_cpu": {sc.LOAD: 3.0, sc.LEARNER: 4.5, sc.OTHER: 0.5}, "stage_rss_mib": {sc.LOAD: 900.0},
           "stage_cuda_mib": {sc.LEARNER: 300.0}, "predict_s": 5.0, "chunk_ms": [100.0, 120.0], "query_slices": 300,
           "peak_rss_mib": 1000.0, "rss_rise_mib": 600.0, "cuda_peak_mib": 320.0}
    opts = BenchOptions(device="cuda")
    cost, profile = sc._sections(opts, (512, 512, 300), 1, [sc._summary("c", [res])], ["c"], [[res]], [], [])
    assert cost.rows[0][4] == pytest.approx(30.0) and cost.rows[0][5] == pytest.approx(60.0) and cost.rows[0][-1] == 320.0
    assert len(profile.headers) == 6 and all(len(row) == 6 for row in profile.rows)
    learner = next(row for row in profile.rows if row[0] == sc.LEARNER)
    assert learner[1:] == [5.0, 4.5, pytest.approx(50.0), None, 300.0]  # on CUDA the share is of the wall time
    assert "CUDA peak MiB" in profile.markdown()
