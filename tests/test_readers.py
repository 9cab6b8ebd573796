"""Annotation readers on small files in each dataset's real layout (tests/fixtures/annotations)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from elta import config
from elta.data.annotations import read_annotations
from elta.data.formats import FORMATS, CsvColumns, Format, detect_format, register_format
from elta.errors import AnnotationError

FIXTURES = Path(__file__).parent / "fixtures" / "annotations"
BASE = ["image_id", "path", "mos", "std", "split", "group", "source", "row"]
AVA_HEADER = "image_id," + ",".join(f"score{k}" for k in range(2, 12))


def _read(*args, **kwargs):
    """read_annotations as (frame, info, problems)."""
    annotations = read_annotations(*args, **kwargs)
    return annotations.frame, annotations.info, annotations.problems


def _problems(problems) -> list[tuple[str, int]]:
    return [(p["file"], p["row"]) for p in problems]


def _reasons(problems) -> list[str]:
    return [p["reason"] for p in problems]


# ---------------------------------------------------------------------------------------------- AVA


def test_ava_values_distribution_groups_and_problems(tmp_path):
    df, info, problems = _read(FIXTURES / "ava" / "AVA.txt", images=tmp_path)
    assert list(df.columns) == BASE + [f"p{k}" for k in range(1, 11)]
    assert df["image_id"].tolist() == ["953619", "954184", "953756", "954018"]
    # 953619: votes 0 1 5 17 38 36 15 6 5 1 -> 699 / 124; 954184: 0 0 1 2 3 2 1 1 0 0 -> 53 / 10
    np.testing.assert_allclose(df["mos"], [699 / 124, 5.3, 5.5, 9.25], rtol=1e-12)
    np.testing.assert_allclose(df.loc[1, "std"], np.sqrt(30.1 - 5.3**2), rtol=1e-12)
    np.testing.assert_allclose(
        df.loc[1, [f"p{k}" for k in range(1, 11)]].to_numpy(float), [0, 0, 0.1, 0.2, 0.3, 0.2, 0.1, 0.1, 0, 0]
    )
    np.testing.assert_allclose(df[[f"p{k}" for k in range(1, 11)]].sum(axis=1), 1.0)
    assert df["group"].tolist() == ["1", "", "19", "15"]
    assert df["split"].tolist() == ["train"] * 4
    assert df["row"].tolist() == [1, 2, 6, 8]
    assert df["source"].unique().tolist() == ["AVA.txt"]
    assert df.loc[0, "path"] == str(tmp_path / "953619.jpg")
    assert _problems(problems) == [
        ("AVA.txt", 3),
        ("AVA.txt", 4),
        ("AVA.txt", 5),
        ("AVA.txt", 7),
        ("AVA.txt", 9),
    ]
    reasons = _reasons(problems)
    assert reasons[0].startswith("14 fields, expected 15")
    assert reasons[1] == "all vote counts are zero"
    assert reasons[2] == "duplicate image id '953619' (first in AVA.txt line 1)"
    assert reasons[3] == "vote count for rating 2 = 'x' is not a number"
    assert reasons[4] == "vote count for rating 2 = '-1' is negative"
    assert info.format == "ava"
    assert info.centers == [float(k) for k in range(1, 11)]
    assert info.has_distribution is True
    assert info.score_range == [1.0, 10.0]
    assert info.acc_threshold == 5.0
    assert info.split_source == "none: every row is train"
    assert info.images_root == str(tmp_path)
    assert df["row"].dtype == np.int64 and df["mos"].dtype == np.float64


def test_ava_strict_raises_with_file_and_line():
    with pytest.raises(AnnotationError) as info:
        read_annotations(FIXTURES / "ava" / "AVA.txt", strict=True)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "AVA.txt:3: 14 fields, expected 15" in message
    assert "AVA.txt:9: vote count for rating 2 = '-1' is negative" in message


def test_strict_lists_the_first_20_problems_and_the_total(tmp_path):
    lines = [f"{i} {1000 + i} 0 0 0 0 0 0 0 0 0 0 0 0 1" for i in range(1, 26)]
    lines.append("26 2000 1 1 1 1 1 1 1 1 1 1 0 0 1")
    (tmp_path / "AVA.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError) as info:
        read_annotations(tmp_path / "AVA.txt", strict=True)
    message = str(info.value)
    assert "25 problem(s)" in message and "… 5 more" in message
    assert "AVA.txt:20: all vote counts are zero" in message and "AVA.txt:21:" not in message
    assert len(read_annotations(tmp_path / "AVA.txt").frame) == 1


def test_ava_split_lists_next_to_the_annotations(tmp_path):
    shutil.copy(FIXTURES / "ava" / "AVA.txt", tmp_path / "AVA.txt")
    (tmp_path / "train.txt").write_text("953619\n954184.jpg\n")
    (tmp_path / "test.txt").write_text("953756\n999999\n953619\n")
    df, info, problems = _read(tmp_path / "AVA.txt")
    assert dict(zip(df["image_id"], df["split"], strict=True)) == {
        "953619": "train",
        "954184": "train",
        "953756": "test",
        "954018": "",
    }
    assert info.split_source == f"split lists train.txt/test.txt in {tmp_path}"
    list_problems = [p for p in problems if p["file"] == "test.txt"]
    assert [(p["row"], p["reason"]) for p in list_problems] == [
        (2, "image id '999999' has no valid row in AVA.txt"),
        (3, "image id '953619' is also in train.txt line 1; kept as train"),
    ]


def test_ava_split_csvs_from_the_splits_argument(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.csv").write_text(
        f",{AVA_HEADER}\n0,953619,0,1,5,17,38,36,15,6,5,1\n1,954018,0,0,0,0,0,0,0,0,3,1\n"
    )
    (splits / "validation.txt").write_text("954184\n")
    (splits / "test.csv").write_text("image_id\n953756\n")
    df, info, problems = _read(FIXTURES / "ava", splits=splits)
    assert df["split"].tolist() == ["train", "val", "test", "train"]
    assert info.split_source == f"split lists train.csv/validation.txt/test.csv in {splits}"
    assert [p["file"] for p in problems] == ["AVA.txt"] * 5


def test_default_image_folder_is_the_usual_one_next_to_the_annotations(tmp_path):
    shutil.copy(FIXTURES / "ava" / "AVA.txt", tmp_path / "AVA.txt")
    df, info, problems = _read(tmp_path / "AVA.txt")
    assert info.images_root == str(tmp_path)
    (tmp_path / "images").mkdir()
    df, info, problems = _read(tmp_path)
    assert info.images_root == str(tmp_path / "images")
    assert df.loc[0, "path"] == str(tmp_path / "images" / "953619.jpg")


# ---------------------------------------------------------------------------------------------- ELTA CSV


def test_elta_csv_folder_recomputes_mos_from_votes_and_splits_by_file_name(tmp_path):
    df, info, problems = _read(FIXTURES / "elta-csv", images=tmp_path)
    assert df["image_id"].tolist() == ["953619", "954184", "953756", "954018"]
    np.testing.assert_allclose(
        df["mos"], [699 / 124, 5.3, 5.5, 9.25], rtol=1e-12
    )  # the score column says 9.99
    assert df["split"].tolist() == ["train", "train", "val", "test"]
    assert df["group"].tolist() == ["1", "", "19", "15"]
    assert df["source"].tolist() == ["train.csv", "train.csv", "val.csv", "test.csv"]
    assert df["row"].tolist() == [2, 3, 2, 2]
    assert _problems(problems) == [("train.csv", 4), ("test.csv", 3)]
    assert _reasons(problems) == [
        "12 fields, expected 14 (one per header column)",
        "duplicate image id '953619' (first in train.csv line 2)",
    ]
    assert info.acc_threshold == 5.0
    assert info.split_source == "file names (train.csv -> train, val.csv -> val, test.csv -> test)"


def test_elta_csv_single_file_not_named_after_a_split_is_train(tmp_path):
    shutil.copy(FIXTURES / "elta-csv" / "val.csv", tmp_path / "ava_subset.csv")
    df, info, problems = _read(tmp_path / "ava_subset.csv", format="elta-csv")
    assert df["split"].tolist() == ["train"]
    assert df["mos"].tolist() == [5.5]


def test_missing_required_columns_name_the_file_and_the_columns(tmp_path):
    (tmp_path / "train.csv").write_text("image_id,score2,score3\n1,2,3\n")
    with pytest.raises(AnnotationError, match=r"train.csv: missing column\(s\) \['score4'"):
        read_annotations(tmp_path / "train.csv", format="elta-csv")


# ---------------------------------------------------------------------------------------------- KonIQ


def test_koniq_quoted_header_votes_and_sd(tmp_path):
    df, info, problems = _read(FIXTURES / "koniq" / "koniq10k_scores_and_distributions.csv", images=tmp_path)
    assert list(df.columns) == BASE + ["p1", "p2", "p3", "p4", "p5"]
    assert df["image_id"].tolist() == ["10004473376.jpg", "10007357496.jpg", "10007903636.jpg"]
    np.testing.assert_allclose(df["mos"], [402 / 105, 373 / 106, 353 / 106], rtol=1e-12)
    np.testing.assert_allclose(df["std"], [0.5809803, 0.6155209, 0.6229716])
    np.testing.assert_allclose(
        df.loc[0, ["p1", "p2", "p3", "p4", "p5"]].to_numpy(float), [0, 0, 25, 73, 7] / np.float64(105)
    )
    assert df.loc[0, "path"] == str(tmp_path / "10004473376.jpg")
    assert _problems(problems) == [
        ("koniq10k_scores_and_distributions.csv", 5),
        ("koniq10k_scores_and_distributions.csv", 6),
    ]
    assert _reasons(problems) == ["c3 = 'NA' is not a number", "all vote counts are zero"]
    assert info.centers == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert info.score_range == [1.0, 5.0]
    assert info.acc_threshold == 3.0


def test_koniq_set_column_gives_the_split(tmp_path):
    header = '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore","set"'
    rows = ['"a.jpg",0,0,1,1,0,2,3.5,0.5,60,"training"', '"b.jpg",1,0,0,0,1,2,3,2,50,"validation"']
    rows.append('"c.jpg",0,1,0,0,0,1,2,0,30,"test"')
    (tmp_path / "koniq10k_distributions_sets.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "1024x768").mkdir()
    df, info, problems = _read(tmp_path)
    assert df["split"].tolist() == ["train", "val", "test"]
    assert df["mos"].tolist() == [3.5, 3.0, 2.0]
    assert info.split_source == "split column 'set'"
    assert df.loc[0, "path"] == str(tmp_path / "1024x768" / "a.jpg")


# ---------------------------------------------------------------------------------------------- PARA


def test_para_folder_bins_paths_groups_and_splits(tmp_path):
    df, info, problems = _read(FIXTURES / "para", images=tmp_path)
    assert list(df.columns) == BASE + [f"p{k}" for k in range(1, 10)]
    assert df["image_id"].tolist() == ["iaa_pub1_.jpg", "iaa_pub2_.jpg", "iaa_pub3_.jpg"]
    # counts 0 0 1 2 5 4 2 1 0 on 1.0..5.0 -> 48.5 / 15; proportions .25 .5 .25 on 3.0, 3.5, 4.0 -> 3.5
    np.testing.assert_allclose(df["mos"], [48.5 / 15, 3.5, 3.0], rtol=1e-12)
    np.testing.assert_allclose(df["std"], [0.6236, 0.3536, 2.0])
    np.testing.assert_allclose(
        df.loc[1, [f"p{k}" for k in range(1, 10)]].to_numpy(float), [0, 0, 0, 0, 0.25, 0.5, 0.25, 0, 0]
    )
    assert df["split"].tolist() == ["train", "train", "test"]
    assert df["group"].tolist() == ["portrait", "scene", "animal"]
    assert df.loc[0, "path"] == str(tmp_path / "session1" / "iaa_pub1_.jpg")
    assert df.loc[2, "path"] == str(tmp_path / "session2" / "iaa_pub3_.jpg")
    assert _problems(problems) == [("PARA-GiaaTrain.csv", 4), ("PARA-GiaaTest.csv", 3)]
    assert _reasons(problems) == ["empty sessionId", "all vote counts are zero"]
    assert info.centers == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert info.acc_threshold == 3.0


def test_para_images_default_to_imgs_beside_the_annotation_folder(tmp_path):
    (tmp_path / "annotation").mkdir()
    (tmp_path / "imgs").mkdir()
    shutil.copy(FIXTURES / "para" / "PARA-GiaaTest.csv", tmp_path / "annotation")
    df, info, problems = _read(tmp_path)
    assert df.loc[0, "path"] == str(tmp_path / "imgs" / "session2" / "iaa_pub3_.jpg")
    assert df["split"].tolist() == ["test"]


# ---------------------------------------------------------------------------------------------- AADB


def test_aadb_folder_scores_splits_and_range(tmp_path):
    df, info, problems = _read(FIXTURES / "aadb", images=tmp_path)
    assert list(df.columns) == BASE
    assert df["mos"].tolist() == [0.35, 0.6, 0.45, 0.8, 0.0]
    assert df["split"].tolist() == ["train", "train", "val", "test", "test"]
    assert df["std"].isna().all()
    assert df.loc[0, "path"] == str(tmp_path / "farm1_255_19452343093_8ee7e5e375_b.jpg")
    assert _problems(problems) == [
        ("imgListTrainRegression_score.txt", 3),
        ("imgListTestNewRegression_score.txt", 2),
    ]
    assert _reasons(problems) == [
        "MOS 1.2 outside the score range [0, 1]",
        "3 fields, expected 2 (image name, score)",
    ]
    assert info.has_distribution is False
    assert info.centers == [0.0, 1.0] and info.score_range == [0.0, 1.0]
    assert info.acc_threshold == 0.5


# ---------------------------------------------------------------------------------------------- generic CSV


def test_generic_csv_tad66k_layout_infers_the_score_range(tmp_path):
    df, info, problems = _read(FIXTURES / "csv" / "tad66k.csv", images=tmp_path)
    assert list(df.columns) == BASE
    assert df["image_id"].tolist() == ["1004.jpg", "1005.jpg", "1007.jpg"]
    assert df["mos"].tolist() == [5.5, 6.25, 4.0]
    assert info.score_range == [4.0, 6.25]
    assert info.acc_threshold == 5.125
    assert _problems(problems) == [("tad66k.csv", 4)]
    assert _reasons(problems) == ["MOS 'abc' is not a finite number"]


def test_generic_csv_split_std_and_unsafe_ids(tmp_path):
    df, info, problems = _read(FIXTURES / "csv" / "meta_info.csv", images=tmp_path, score_range=(0, 100))
    assert df["image_id"].tolist() == ["a.png", "b.png", "c.png"]
    assert df["split"].tolist() == ["train", "val", "test"]
    np.testing.assert_allclose(df["std"], [8.1, 7.5, np.nan])
    assert df.loc[0, "path"] == str(tmp_path / "a.png")
    assert info.split_source == "split column 'split'"
    assert info.score_range == [0.0, 100.0] and info.acc_threshold == 50.0
    assert _problems(problems) == [("meta_info.csv", 5), ("meta_info.csv", 6)]
    assert _reasons(problems)[0].startswith("split 'holdout' is not train")
    assert "'../e.png' points outside the image folder" in _reasons(problems)[1]


def test_generic_csv_infers_the_score_range_from_the_training_rows_only(tmp_path, caplog):
    rows = ["a.jpg,2,train", "b.jpg,8,train", "c.jpg,5,train", "d.jpg,1,test", "e.jpg,9.5,val"]
    (tmp_path / "scores.csv").write_text("image,mos,split\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="elta.data.annotations"):
        df, info, problems = _read(tmp_path / "scores.csv")
    assert info.score_range == [2.0, 8.0] and info.acc_threshold == 5.0  # not [1, 9.5]: no test label leaks
    assert df["image_id"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"] and not problems
    (warning,) = [r.getMessage() for r in caplog.records if "score range not given" in r.getMessage()]
    assert "3 training rows as [2, 8]" in warning and "2 validation / test row(s)" in warning
    assert "--score-range LOW HIGH" in warning


def test_generic_csv_absolute_ids_and_score_range_violations(tmp_path):
    (tmp_path / "scores.csv").write_text("Image_Name,Mos\n/etc/passwd,3\nok.jpg,4.5\nhigh.jpg,5.5\n")
    df, info, problems = _read(tmp_path / "scores.csv", score_range=(1, 5))
    assert df["image_id"].tolist() == ["ok.jpg"]
    assert _reasons(problems) == [
        "image id '/etc/passwd.jpg' is an absolute path; use a path relative to the image folder",
        "MOS 5.5 outside the score range [1, 5]",
    ]


def test_generic_csv_explicit_columns_and_distribution(tmp_path):
    (tmp_path / "votes.csv").write_text("file_id,low,mid,high,origin\nx,1,2,1,web\ny,0,0,2,camera\n")
    columns = CsvColumns(image="file_id", dist=["low", "mid", "high"], group="origin")
    df, info, problems = _read(
        tmp_path / "votes.csv", format="csv", columns=columns, centers=[0.0, 5.0, 10.0]
    )
    assert list(df.columns) == BASE + ["p1", "p2", "p3"]
    assert df["mos"].tolist() == [5.0, 10.0]
    assert df["group"].tolist() == ["web", "camera"]
    np.testing.assert_allclose(df["std"], [np.sqrt(12.5), 0.0])
    assert info.centers == [0.0, 5.0, 10.0] and info.score_range == [0.0, 10.0]
    df, info, problems = _read(tmp_path / "votes.csv", format="csv", columns=columns)
    assert df["mos"].tolist() == [2.0, 3.0]  # default centres 1..K


def test_generic_csv_refuses_dmos_and_unknown_columns(tmp_path):
    (tmp_path / "live.csv").write_text("image,dmos\na.jpg,30\n")
    with pytest.raises(AnnotationError, match="DMOS"):
        read_annotations(tmp_path / "live.csv", format="csv")
    with pytest.raises(AnnotationError, match="no column 'quality'"):
        read_annotations(tmp_path / "live.csv", format="csv", columns=CsvColumns(mos="quality"))


def test_unreadable_files_raise(tmp_path):
    with pytest.raises(AnnotationError, match="no such file"):
        read_annotations(tmp_path / "absent.csv")
    (tmp_path / "empty.csv").write_text("image,mos\n")
    with pytest.raises(AnnotationError, match="empty.csv: no data rows"):
        read_annotations(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text("image,mos\na.jpg,x\n")
    with pytest.raises(AnnotationError, match="bad.csv:2: MOS 'x' is not a finite number"):
        read_annotations(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("ava", "ava"),
        ("ava/AVA.txt", "ava"),
        ("elta-csv", "elta-csv"),
        ("elta-csv/train.csv", "elta-csv"),
        ("koniq", "koniq"),
        ("koniq/koniq10k_scores_and_distributions.csv", "koniq"),
        ("para", "para"),
        ("para/PARA-GiaaTrain.csv", "para"),
        ("aadb", "aadb"),
        ("aadb/imgListValidationRegression_score.txt", "aadb"),
        ("csv/tad66k.csv", "csv"),
        ("csv/meta_info.csv", "csv"),
    ],
)
def test_detect_format_by_name(path, expected):
    assert detect_format(FIXTURES / path) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("ava/AVA.txt", "ava"),
        ("aadb/imgListTrainRegression_score.txt", "aadb"),
        ("koniq/koniq10k_scores_and_distributions.csv", "koniq"),
        ("para/PARA-GiaaTest.csv", "para"),
        ("elta-csv/val.csv", "elta-csv"),
    ],
)
def test_detect_format_by_content(tmp_path, source, expected):
    renamed = tmp_path / ("labels" + Path(source).suffix)
    shutil.copy(FIXTURES / source, renamed)
    assert detect_format(renamed) == expected
    assert read_annotations(renamed).info.format == expected


def test_detect_format_explains_unknown_and_ambiguous_inputs(tmp_path):
    (tmp_path / "odd.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(AnnotationError) as info:
        detect_format(tmp_path / "odd.csv")
    assert "'foo,bar'" in str(info.value) and "--format" in str(info.value) and "koniq" in str(info.value)
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(FIXTURES / "para" / "PARA-GiaaTest.csv", both)
    shutil.copy(FIXTURES / "aadb" / "imgListTrainRegression_score.txt", both)
    with pytest.raises(AnnotationError, match=r"several formats \['para', 'aadb'\]"):
        detect_format(both)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationError, match="no known annotation file"):
        detect_format(tmp_path / "empty")


def test_splits_argument_overrides_the_split_of_any_format(tmp_path):
    (tmp_path / "train.txt").write_text("1004.jpg\n")
    (tmp_path / "test.txt").write_text("1005\n")
    df, info, problems = _read(FIXTURES / "csv" / "tad66k.csv", splits=tmp_path)
    assert df["split"].tolist() == ["train", "test", ""]
    assert info.split_source == f"split lists train.txt/test.txt in {tmp_path}"
    with pytest.raises(AnnotationError, match="train.txt is a file: splits must be a folder"):
        read_annotations(FIXTURES / "csv" / "tad66k.csv", splits=tmp_path / "train.txt")
    (tmp_path / "none").mkdir()
    with pytest.raises(AnnotationError, match="no train.txt, val.txt, test.txt"):
        read_annotations(FIXTURES / "csv" / "tad66k.csv", splits=tmp_path / "none")


def test_skipped_rows_are_logged_with_their_count(caplog):
    read_annotations(FIXTURES / "koniq")
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "problem" in r.getMessage()
    ]
    assert len(warnings) == 1 and "2 problem(s)" in warnings[0]


# ---------------------------------------------------------------------------------------------- registry


def _fixture_paths(fmt: Format) -> list[Path]:
    """The fixture folder of a format (when its files have known names) and each file in it."""
    folder = FIXTURES / fmt.name
    assert folder.is_dir(), f"format {fmt.name!r} has no fixture: add {folder} with a file in its real layout"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return ([folder] if fmt.files else []) + files


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=list(FORMATS))
def test_every_registered_format_is_detected_and_read_on_its_own_scale(fmt, tmp_path):
    for path in _fixture_paths(fmt):
        assert detect_format(path) == fmt.name, path
        df, info, problems = _read(path, images=tmp_path)
        assert info.format == fmt.name and len(df) > 0 and info.rows_read == len(df) + len(problems)
        lo, hi = fmt.score_range or (df["mos"].min(), df["mos"].max())
        assert info.score_range == [lo, hi]
        assert info.acc_threshold == (fmt.acc_threshold if fmt.acc_threshold is not None else (lo + hi) / 2)
        assert df["mos"].between(lo, hi).all()
        if fmt.centers is not None:
            assert info.has_distribution and info.centers == list(fmt.centers)
            assert list(df.columns) == BASE + [f"p{k}" for k in range(1, len(fmt.centers) + 1)]


def test_the_config_offers_every_registered_format():
    assert set(config.FORMATS) == {"auto", *FORMATS}
    with pytest.raises(ValueError, match="already registered"):
        register_format(FORMATS["ava"])
