"""The data contract: accepted forms, every bad-input class, and 'a failed read writes nothing'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.cli import main
from arena_assets.core.contract import (
    LABEL_COLS,
    TEXT_COLS,
    ContractError,
    chosen_goes_to_a,
    parse_text_cell,
    read_external,
    read_table,
    read_test,
    read_train,
    summarize,
    validate_files,
    write_table,
)

HEADER = "id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"


def cell(turns: list[str | None]) -> str:
    """A Kaggle text cell (JSON list) quoted for CSV."""
    return '"' + json.dumps(turns).replace('"', '""') + '"'


def good_line(i: int, a: int = 1, b: int = 0, t: int = 0) -> str:
    return f"{i},{cell(['q' + str(i)])},{cell(['ra'])},{cell(['rb'])},{a},{b},{t}\n"


def write(tmp_path: Path, text: str, name: str = "train.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def good_rows(n: int = 3) -> str:
    return "".join(good_line(i + 1, *[(1, 0, 0), (0, 1, 0), (0, 0, 1)][i % 3]) for i in range(n))


# ------------------------------------------------------------------------- accepted forms
def test_one_hot_labels_ids_and_turns(tmp_path: Path) -> None:
    big = "98765432109876543"  # > 2^53: a float round trip would change it
    text = HEADER + good_rows(2) + f"{big},{cell(['p1', 'p2'])},{cell(['x', None])},{cell([None, 'y'])},0,0,1\n"
    df = read_train(write(tmp_path, text))
    assert df["id"].tolist() == ["1", "2", big]
    row = df.iloc[2]
    assert row["prompt"] == ["p1", "p2"]
    assert row["response_a"] == ["x", ""] and row["response_b"] == ["", "y"]
    assert df[LABEL_COLS].dtypes.tolist() == [np.float64] * 3
    assert df[LABEL_COLS].to_numpy().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert df["model_a"].isna().all()  # optional columns absent -> null


def test_probability_labels_with_suffix_and_extra_and_index_columns(tmp_path: Path) -> None:
    text = (
        ",id,model_a,model_b,prompt,response_a,response_b,winner_model_a_prob,winner_model_b_prob,"
        "winner_tie_prob,extra\n"
        f"0,11,m1,m2,{cell(['p'])},{cell(['a'])},{cell(['b'])},0.2,0.5,0.3,zzz\n"
        f"5,12,m3,,{cell(['p'])},{cell(['a'])},{cell(['b'])},0.333333333333,0.333333333333,0.333333333334,\n"
    )
    df = read_train(write(tmp_path, text))
    assert list(df.columns) == ["id", *TEXT_COLS, "model_a", "model_b", *LABEL_COLS]
    assert df["id"].tolist() == ["11", "12"]
    assert df.loc[0, LABEL_COLS].tolist() == pytest.approx([0.2, 0.5, 0.3])
    assert df["model_a"].tolist() == ["m1", "m3"] and pd.isna(df["model_b"].iloc[1])


def test_winner_column(tmp_path: Path) -> None:
    text = "id,prompt,response_a,response_b,winner\n" + "".join(
        f"{i},{cell(['p'])},{cell(['a'])},{cell(['b'])},{w}\n"
        for i, w in enumerate(["model_a", "model_b", "tie", "tie (bothbad)"])
    )
    df = read_train(write(tmp_path, text))
    assert df[LABEL_COLS].to_numpy().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_text_cell_rules() -> None:
    assert parse_text_cell('["a", null, ""]') == ["a", "", ""]
    assert parse_text_cell("plain text, not JSON") == ["plain text, not JSON"]
    assert parse_text_cell('["\\ud83d\\ude00 ok"]') == ["\U0001F600 ok"]  # escaped pair decodes
    lone = parse_text_cell('["bad \\ud83d here"]')[0]
    assert lone == "bad \ufffd here"
    lone.encode("utf-8")  # would raise on a surrogate
    assert parse_text_cell('["a\\/b"]') == ["a/b"]
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_text_cell('["unterminated')
    with pytest.raises(ValueError, match="turn 1 is a int"):
        parse_text_cell("[1]")


def test_lone_surrogate_survives_parquet_and_tokenizer_input(tmp_path: Path) -> None:
    text = HEADER + f'1,"[""x \\ud800 y""]",{cell(["a"])},{cell(["b"])},1,0,0\n'
    df = read_train(write(tmp_path, text))
    assert df.loc[0, "prompt"] == ["x \ufffd y"]
    back = read_table(write_table(df, tmp_path / "t.parquet"))
    assert back.loc[0, "prompt"] == ["x \ufffd y"]


def test_test_file_and_roundtrip(tmp_path: Path) -> None:
    text = "id,prompt,response_a,response_b\n" + f"007,{cell(['p'])},{cell(['a'])},{cell(['b'])}\n"
    df = read_test(write(tmp_path, text, "test.csv"))
    assert df["id"].tolist() == ["007"]  # leading zero kept: ids are never numbers
    back = read_table(write_table(df, tmp_path / "test.parquet"))
    assert back["id"].tolist() == ["007"] and back["prompt"].tolist() == [["p"]]
    assert isinstance(back.loc[0, "response_a"], list)


def test_sample_files_validate_and_summarize(sample_dir: Path) -> None:
    res = validate_files(sample_dir / "train.csv", sample_dir / "test.csv")
    assert res["train"]["rows"] == 400 and res["test"]["rows"] == 120
    assert res["train_test_id_overlap"] == 0
    s = res["train"]
    assert sum(s["label_argmax_counts"].values()) == 400
    assert sum(s["label_mean"].values()) == pytest.approx(1.0, abs=1e-3)
    assert s["turns"]["multi_turn_rows"] > 0 and s["empty_turns"] > 0
    assert s["longest_cell"]["chars"] > 0 and s["longest_cell"]["column"] in TEXT_COLS


def test_real_rows_validate(real_sample_dir: Path) -> None:
    """Real competition rows (../shared, never copied here): every quirk must be accepted."""
    tr = read_train(real_sample_dir / "train_sample.csv")
    te = read_test(real_sample_dir / "test.csv")
    assert len(tr) == 1000 and len(te) == 3
    assert tr["id"].map(lambda s: int(s) > 2**31).any()
    assert tr["id"].is_unique
    assert (tr["prompt"].map(len) > 1).sum() > 0  # multi-turn rows
    np.testing.assert_allclose(tr[LABEL_COLS].sum(axis=1), 1.0)
    for c in TEXT_COLS:
        for turns in tr[c]:
            for t in turns:
                t.encode("utf-8")  # no surrogate left anywhere
    s = summarize(tr)
    assert s["rows"] == 1000 and s["turns"]["max"] > 1


# ------------------------------------------------------------------------- bad inputs
BAD_CASES = {
    # name: (file text, fragments the one-line message must contain)
    "label_sum": (HEADER + good_rows(7) + good_line(8, 1, 0.3, 0), ["train.csv row 8", "winner_model_a+winner_model_b+winner_tie = 1.3", "must be 1"]),
    "label_not_number": (HEADER + good_rows(2) + good_line(3, "yes", 0, 0), ["row 3", "winner_model_a", "'yes' is not a number"]),  # type: ignore[arg-type]
    "label_out_of_range": (HEADER + good_line(1, 1.5, -0.5, 0), ["row 1", "winner_model_a = 1.5", "[0, 1]"]),
    "label_empty": (HEADER + good_rows(1) + good_line(2, "", 1, 0), ["row 2", "winner_model_a is empty"]),  # type: ignore[arg-type]
    "id_empty": (HEADER + good_rows(2) + good_line(3).replace("3,", ",", 1), ["row 3", "id is empty"]),
    "id_duplicate": (HEADER + good_rows(3) + good_line(2), ["row 4", "id 2 duplicates row 2"]),
    "missing_column": ("id,prompt,response_a,winner_model_a,winner_model_b,winner_tie\n1,a,b,1,0,0\n", ["train.csv", "missing column 'response_b'"]),
    "missing_labels": ("id,prompt,response_a,response_b\n1,a,b,c\n", ["train.csv", "missing label columns"]),
    "bad_winner": ("id,prompt,response_a,response_b,winner\n1,a,b,c,model_c\n", ["row 1", "winner = 'model_c'"]),
    "empty_file": ("", ["train.csv", "file is empty"]),
    "header_only": (HEADER, ["train.csv", "header only"]),
    "truncated": (HEADER + good_rows(2) + '3,"[""cut off', ["train.csv", "truncated file", "unterminated quote"]),
    "invalid_json_cell": (HEADER + good_rows(1) + f'2,"[""a"", ",{cell(["a"])},{cell(["b"])},1,0,0\n', ["row 2", "prompt", "not valid JSON"]),
    "turn_not_string": (HEADER + f'1,{cell(["p"])},"[{{""role"": ""x""}}]",{cell(["b"])},1,0,0\n', ["row 1", "response_a", "turn 1 is a dict"]),
    "too_many_fields": (HEADER + good_rows(1) + "2,a,b,c,1,0,0,extra\n", ["train.csv", "malformed CSV", "line 3"]),
    "too_few_fields": (HEADER + good_rows(1) + f"2,{cell(['p'])}\n", ["row 2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_error(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(ContractError) as ei:
        read_train(path)
    msg = str(ei.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (case, msg)


@pytest.mark.parametrize("case", ["label_sum", "truncated", "invalid_json_cell", "header_only"])
def test_failed_validate_writes_nothing(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI exits 2 with the message on stderr; the output parquet is not created, and an
    existing one (from an earlier good run) is left byte-for-byte unchanged."""
    path = write(tmp_path, BAD_CASES[case][0])
    out = tmp_path / "out"
    assert main(["validate", "--train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BAD_CASES[case][1][0] in err
    assert not (out / "train.parquet").exists()

    good = write(tmp_path, HEADER + good_rows(3), "good.csv")
    assert main(["validate", "--train", str(good), "--out", str(out)]) == 0
    before = (out / "train.parquet").read_bytes()
    assert main(["validate", "--train", str(path), "--out", str(out)]) == 2
    assert (out / "train.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]  # no temp file left


def test_bad_test_file_writes_no_train_table_either(tmp_path: Path) -> None:
    good = write(tmp_path, HEADER + good_rows(3))
    bad_test = write(tmp_path, "id,prompt,response_a\n1,a,b\n", "test.csv")
    with pytest.raises(ContractError, match="test.csv: missing column 'response_b'"):
        validate_files(good, bad_test, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_bytes(HEADER.encode() + b'1,"[""caf\xe9""]","[""a""]","[""b""]",1,0,0\n')
    with pytest.raises(ContractError, match="train.csv row 1: not valid UTF-8 at byte 82 of the file"):
        read_train(p)


# ------------------------------------------------------------------------- external
def test_external_styles_mixed_jsonl(tmp_path: Path) -> None:
    rows = [
        {"id": "u1", "prompt": "hi", "chosen": "good answer", "rejected": "bad answer"},
        {"prompt_id": "u2", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        {"question_id": 77, "model_a": "x", "model_b": "y", "winner": "tie (bothbad)",
         "conversation_a": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
         "conversation_b": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "b1"},
                            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b2"}]},
        {"id": "k1", "prompt": '["p"]', "response_a": '["a"]', "response_b": '["b"]', "winner": "model_b", "source": "mine"},
    ]
    p = tmp_path / "ext.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    df = read_external(p).set_index("id")
    assert df.loc["u1", "source"] == "ultrafeedback" and df.loc["77", "source"] == "arena"
    assert df.loc["k1", "source"] == "mine"
    # chosen lands in A or B by the documented hash rule, and the label follows it
    for rid, chosen, rejected in [("u1", ["good answer"], ["bad answer"]), ("u2", ["c"], [""])]:
        if chosen_goes_to_a(rid):
            assert df.loc[rid, "response_a"] == chosen and df.loc[rid, "winner_model_a"] == 1.0
        else:
            assert df.loc[rid, "response_b"] == chosen and df.loc[rid, "winner_model_b"] == 1.0
        assert df.loc[rid, "winner_tie"] == 0.0
    assert df.loc["u2", "prompt"] == ["q"]  # taken from chosen's user message
    assert df.loc["77", "prompt"] == ["q1", "q2"]
    assert df.loc["77", "response_a"] == ["a1", "a2"] and df.loc["77", "response_b"] == ["b1", "b2"]
    assert df.loc["77", LABEL_COLS].tolist() == [0.0, 0.0, 1.0]
    assert df.loc["k1", LABEL_COLS].tolist() == [0.0, 1.0, 0.0]
    # parquet input gives the same table
    write_table(df.reset_index(), tmp_path / "ext.parquet")
    again = read_external(tmp_path / "ext.parquet").set_index("id")
    assert again["response_a"].tolist() == df["response_a"].tolist()


def test_chosen_position_is_balanced() -> None:
    share = np.mean([chosen_goes_to_a(str(i)) for i in range(4000)])
    assert 0.45 < share < 0.55


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"id": "a", "conversation_a": [{"role": "user", "content": "q"}], "conversation_b": [{"role": "user", "content": "q"}], "winner": "??"}, "winner = '??'"),
        ({"id": "b", "chosen": "x"}, "rejected is empty"),
        ({"id": "c", "text": "nothing usable"}, "is neither a pairwise row"),
        ({"id": "d", "prompt": "p", "chosen": "[broken", "rejected": "r"}, "not valid JSON"),
    ],
)
def test_external_errors(tmp_path: Path, row: dict, fragment: str) -> None:
    p = tmp_path / "ext.jsonl"
    p.write_text(json.dumps({"id": "ok", "prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ContractError) as ei:
        read_external(p)
    assert f"ext.jsonl row 2 (id {row['id']})" in str(ei.value) and fragment in str(ei.value)


def test_external_sample_csv(sample_dir: Path) -> None:
    df = read_external(sample_dir / "external.csv")
    assert len(df) == 400
    assert set(df["source"]) == {"ultrafeedback", "arena"}
    np.testing.assert_allclose(df[LABEL_COLS].sum(axis=1), 1.0)
    uf = df[df["source"] == "ultrafeedback"]
    assert (uf["winner_tie"] == 0).all()
    share_a = uf["winner_model_a"].mean()
    assert 0.35 < share_a < 0.65  # no position bias from always putting chosen in A
    assert pd.Series([x for x in df["id"]]).is_unique
