"""The documentation stands on its own: every file it links to or names as ``../...`` is in the repository."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "manifests/README.md", "benchmarks/README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_links_point_inside_the_repository(doc):
    path = os.path.join(REPO, doc)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]
    for target in targets:
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert resolved.startswith(REPO + os.sep), f"{doc}: {target} leaves the repository"
        assert os.path.exists(resolved), f"{doc}: {target} does not exist"
    assert "../shared/formats.md" not in text  # the corpus layouts are docs/formats.md


def test_the_corpus_layouts_are_documented_for_both_corpora():
    with open(os.path.join(REPO, "docs", "formats.md"), encoding="utf-8") as f:
        text = f.read()
    for name in (
        "wav2capt.txt",
        "Flicker8k_Dataset",
        "Flickr_8k.devImages.txt",
        "Flickr8k.token.txt",
        "SpokenCOCO_train.json",
        "dataset_coco.json",
        "restval",
        "SpokenCOCO_ksplit_",
    ):
        assert name in text, name


def test_the_readme_is_a_front_door_and_every_docs_page_is_in_its_map():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    linked = {os.path.normpath(t) for t in LINK.findall(readme)}
    pages = {os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")}
    assert pages - linked == set(), "docs pages the README's map does not link"
