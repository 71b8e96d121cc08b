"""Reading the names of a label map's structures: JSON and CSV, errors naming the file."""

import json

import pytest

from fastcascade.io.structures import read_structure_names


def test_json_and_csv_give_the_same_names(tmp_path):
    (tmp_path / "n.json").write_text(json.dumps({"0": "background", "5": "liver", "52": "aorta"}))
    (tmp_path / "n.csv").write_text(
        "group,original_idx,structure,id\norgans,5,liver,5\n\nvessels,1,aorta,52\n"
    )
    want = {5: "liver", 52: "aorta"}  # id 0 is the background, not a structure
    assert read_structure_names(tmp_path / "n.json") == want
    assert read_structure_names(tmp_path / "n.csv") == want


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("a.json", '["liver"]', "one JSON object"),
        ("b.json", '{"x": "liver"}', "'x' is not an integer"),
        ("c.json", '{"-1": "liver"}', "not an integer >= 0"),
        ("d.json", '{"3": ""}', "id 3 has no structure name"),
        ("e.json", "{", "not valid JSON"),
        ("f.csv", "id,name\n1,liver\n", "columns 'id' and 'structure'"),
        ("g.csv", "id,structure\n1,liver\n1,spleen\n", r"g.csv:3: id 1 is named twice"),
        ("h.json", '{"0": "background"}', "names no structures"),
        ("i.txt", "1 liver", ".json or .csv"),
    ],
)
def test_malformed_files_are_refused_naming_the_file(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_structure_names(tmp_path / name)
    assert name in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_structure_names(tmp_path / "nope.json")


def test_the_real_cases_name_our_structures(real_cases):
    names_a, names_e = (read_structure_names(real_cases[c][2]) for c in ("case_a", "case_e"))
    for sid, name in {1: "spleen", 5: "liver", 7: "pancreas", 52: "aorta"}.items():
        assert names_a[sid] == names_e[sid] == name
