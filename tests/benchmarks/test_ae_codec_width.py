from tests.benchmarks.conftest import run_script


def test_each_family_gets_its_width_and_losses_at_each_ratio(llama_folder, tmp_path):
    out = tmp_path / "width.md"
    args = ["--model", llama_folder, "--targets", "k,up", "--ratios", "1.5", "4"]
    run_script("ae_codec_width", *args, "--quantize", "int4:g16", "--out", str(out))
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line[:4] == "| 1/"]
    assert [(r[0], r[1]) for r in rows] == [
        ("| 1/1.5", "k"),
        ("| 1/1.5", "up"),
        ("| 1/4", "k"),
        ("| 1/4", "up"),
    ]

    def widths(column: str) -> tuple[int, int]:
        low, _, high = column.partition("-")
        return int(low), int(high or low)

    budget = {(r[0], r[1]): widths(r[2]) for r in rows}
    stored = {(r[0], r[1]): widths(r[3]) for r in rows}
    assert budget[("| 1/1.5", "up")] > budget[("| 1/4", "up")]  # a wider budget, a wider code
    for key, (_, highest) in stored.items():
        assert highest <= budget[key][1]  # the codec may store a narrower code, never wider
    for row in rows:
        float_loss, stored_loss = float(row[4]), float(row[5])
        assert 0 <= float_loss <= stored_loss  # rounding costs
        assert float(row[6].split()[0]) >= stored_loss  # the worst layer, not the median
