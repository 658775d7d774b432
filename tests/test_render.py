"""`tokentrim render`: a playable mp4 with the expected frames and a stats table with one row per chunk."""

from __future__ import annotations

import av
from click.testing import CliRunner

from jobs.cli import main, slug
from pipeline.model.backend import PRESETS
from pipeline.store import Store

STAT_COLUMNS = {"prompt_id", "render_hash", "chunk", "latent_frames", "severity", "mu", "sigma", "threshold",
                "verdict", "attempts", "tokens_pruned", "cache_tokens", "cache_bytes", "latent_dist_prev",
                "latent_dist_first", "pixel_frames", "luma", "saturation", "clipped", "steadiness", "hist_dist_first",
                "t_denoise_s", "t_trim_s", "t_commit_s", "t_decode_s", "t_encode_s"}


def test_render_writes_a_playable_video_and_one_stats_row_per_chunk(tmp_path):
    chunks = 4
    result = CliRunner().invoke(main, ["render", "a fox in the snow", "--model", "tiny", "--chunks", str(chunks),
                                       "--out", str(tmp_path), "--id", "fox"])
    assert result.exit_code == 0, result.output
    assert "video:" in result.output
    with av.open(str(tmp_path / "fox.mp4")) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    spec = PRESETS["tiny"]
    assert len(frames) == 1 + 4 * (3 * chunks - 1)  # Wan VAE: 1 + 4 (F_lat - 1)
    assert (frames[0].height, frames[0].width) == (spec.height_px, spec.width_px)
    table = Store(str(tmp_path)).get_table("fox.stats.parquet")
    assert table.num_rows == chunks
    assert STAT_COLUMNS <= set(table.column_names)
    assert table.column("chunk").to_pylist() == list(range(chunks))
    assert table.column("verdict").to_pylist()[:2] == ["warmup", "warmup"]


def test_render_rejects_bad_options_by_name(tmp_path):
    result = CliRunner().invoke(main, ["render", "x", "--p", "1.5", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == "Error: Invalid value for --p: `p` must be in (0, 1], got 1.5"
    result = CliRunner().invoke(main, ["render", "x", "--model", "tiny", "--width", "100", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "width_px" in result.output
    result = CliRunner().invoke(main, ["render", "x", "--model", "tiny", "--id", "../escape", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "prompt_id" in result.output


def test_slug_is_file_safe():
    assert slug("A Cat, surfing!  (4k)") == "a-cat-surfing-4k"
    assert slug("???") == "prompt"
