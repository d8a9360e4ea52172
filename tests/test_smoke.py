from spear.formats import MANIFEST_SCHEMA, read_metadata, with_metadata


def test_metadata_round_trip() -> None:
    schema = with_metadata(MANIFEST_SCHEMA, "manifest", 1, teacher="wavlm")
    assert read_metadata(schema) == {"schema": "manifest", "version": 1, "teacher": "wavlm"}
