"""Proves tests/hub_server.py against the real huggingface_hub client (and peft).

Run (no conftest needed; HF_ENDPOINT must be set before huggingface_hub is imported):

    cd /work/main
    export HF_ENDPOINT=http://127.0.0.1:$(python -c 'from tests.hub_server import free_port; print(free_port())')
    HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 python -m pytest tests/test_hub_server.py -q -p tests.hub_server

If HF_ENDPOINT is not exported, the line below picks a port (works as long as nothing imported
huggingface_hub earlier in the session).
"""

import os

from tests.hub_server import free_port

os.environ.setdefault("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")

import re  # noqa: E402

import pytest  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

HEX40 = re.compile(r"[0-9a-f]{40}")
REPO = "user/demo"


def read_tree(root):
    return {
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(root)
        for f in names
    }


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "b.json").write_bytes(b'{"b": 1}')
    return root


def test_offline_mode_is_restored_outside_hub_online(local_hub):
    if not constants.HF_HUB_OFFLINE:
        pytest.skip("session not started with HF_HUB_OFFLINE=1")
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().repo_info(REPO)
    assert constants.is_offline_mode()


def test_create_repo_twice(hub_online):
    api = HfApi()
    url = api.create_repo(REPO, repo_type="model", private=False, exist_ok=True)
    assert url.repo_id == REPO and url == f"{hub_online.url}/{REPO}"
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo("noslash", exist_ok=True).repo_id == "user/noslash"
    assert api.repo_exists(REPO) and not api.repo_exists("user/nope")
    # Like the Hub: a new repo already has an initial commit with .gitattributes on main.
    assert list(hub_online.files(REPO)) == [".gitattributes"]
    assert api.repo_info(REPO).sha == hub_online.refs(REPO)["branches"]["main"]


def test_upload_folder_is_one_commit(hub_online, folder):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    hub_online.requests.clear()
    info = api.upload_folder(repo_id=REPO, folder_path=folder, path_in_repo="adapter", commit_message="add")
    assert HEX40.fullmatch(info.oid) and info.oid == hub_online.refs(REPO)["branches"]["main"]
    assert info.commit_url == f"{hub_online.url}/{REPO}/commit/{info.oid}"
    assert [r for r in hub_online.requests if r[0] == "POST" and "/commit/" in r[1]] == [
        ("POST", f"/api/models/{REPO}/commit/main")
    ]
    expected = {f"adapter/{k}": v for k, v in read_tree(folder).items()}
    assert hub_online.files(REPO) == {".gitattributes": hub_online.files(REPO)[".gitattributes"], **expected}
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["add", "initial commit"] and commits[0].commit_id == info.oid
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *expected])
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO, path_in_repo="adapter")}
    assert tree == {"adapter/a.txt": "RepoFile", "adapter/sub": "RepoFolder", "adapter/weights.bin": "RepoFile"}
    # Re-uploading unchanged files makes no commit (preupload reports the remote oids).
    again = api.upload_folder(repo_id=REPO, folder_path=folder, path_in_repo="adapter")
    assert again.oid == info.oid and len(api.list_repo_commits(REPO)) == 2


def test_tags_refs_and_snapshots(hub_online, folder, tmp_path):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    v1 = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v1").oid
    api.create_tag(REPO, tag="v1", revision="main", tag_message="first")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(REPO, tag="v1", revision="main")
    assert err.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", exist_ok=True)
    v2 = api.upload_file(path_or_fileobj=b"changed", path_in_repo="a.txt", repo_id=REPO).oid
    api.create_branch(REPO, branch="dev", revision="v1")
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2, "dev": v1}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", v1)]
    assert hub_online.refs(REPO) == {"branches": {"main": v2, "dev": v1}, "tags": {"v1": v1}}

    original = read_tree(folder)
    for rev in ("v1", "dev", v1):
        path = snapshot_download(REPO, revision=rev, allow_patterns=["*.txt", "sub/*"])
        assert read_tree(path) == {"a.txt": original["a.txt"], "sub/b.json": original["sub/b.json"]}
    full = snapshot_download(REPO, revision="main", local_dir=tmp_path / "main")
    assert {k: v for k, v in read_tree(full).items() if not k.startswith(".cache")} == hub_online.files(REPO)
    assert hub_online.files(REPO)["a.txt"] == b"changed" and hub_online.files(REPO, "v1")["a.txt"] == b"alpha\n"

    info = api.model_info(REPO, revision="v1", files_metadata=True)
    assert info.sha == v1 and {s.rfilename: s.size for s in info.siblings}["weights.bin"] == 10240
    assert sorted(api.list_repo_files(REPO, revision="v1")) == [".gitattributes", "a.txt", "sub/b.json", "weights.bin"]
    assert api.revision_exists(REPO, "v1") and api.revision_exists(REPO, v2) and not api.revision_exists(REPO, "v9")
    assert api.file_exists(REPO, "sub/b.json", revision="v1") and not api.file_exists(REPO, "nope.txt")

    api.delete_tag(REPO, tag="v1")
    assert api.list_repo_refs(REPO).tags == []


def test_download_errors(hub_online):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert open(hf_hub_download(REPO, "x.txt", revision="main"), "rb").read() == b"x"
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "x.txt", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "x.txt")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("user/missing")
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(REPO, tag="t", revision="no-such-branch")


def test_private_repo_needs_a_token(hub_online):
    api = HfApi()
    api.create_repo("user/secret", private=True)
    assert api.model_info("user/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/secret", ".gitattributes", token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("user/secret")


def test_readme_upload_validates_yaml_and_deletions(hub_online):
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    readme = b"---\nlicense: mit\n---\n# Demo\n"
    api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=REPO)
    assert ("POST", "/api/validate-yaml") in hub_online.requests
    assert hub_online.files(REPO)["README.md"] == readme
    api.create_commit(
        REPO,
        [CommitOperationAdd("d/1.txt", b"1"), CommitOperationAdd("d/2.txt", b"2"), CommitOperationAdd("k", b"k")],
        commit_message="files",
    )
    api.create_commit(
        REPO, [CommitOperationDelete("d/"), CommitOperationDelete("README.md")], commit_message="delete"
    )
    assert sorted(hub_online.files(REPO)) == [".gitattributes", "k"]
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("gone.txt")], commit_message="x")
    head = hub_online.refs(REPO)["branches"]["main"]
    with pytest.raises(HfHubHTTPError) as err:  # stale parent_commit
        api.create_commit(REPO, [CommitOperationAdd("z", b"z")], commit_message="z", parent_commit="0" * 40)
    assert err.value.response.status_code == 412 and hub_online.refs(REPO)["branches"]["main"] == head


def test_peft_from_pretrained_by_tag(hub_online, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def base():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
        return transformers.GPT2LMHeadModel(cfg)

    def lora_weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    model_v1 = peft.get_peft_model(base(), lora)
    model_v1.save_pretrained(tmp_path / "v1")
    model_v2 = peft.get_peft_model(base(), lora)
    with torch.no_grad():
        for name, param in model_v2.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    model_v2.save_pretrained(tmp_path / "v2")

    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "v1", path_in_repo="adapter")
    api.create_tag(REPO, tag="v1")
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "v2", path_in_repo="adapter")

    hub_online.requests.clear()
    loaded = peft.PeftModel.from_pretrained(base(), REPO, subfolder="adapter", revision="v1")
    expected, got = lora_weights(model_v1), lora_weights(loaded)
    assert expected.keys() == got.keys() and len(got) > 0
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not any(torch.equal(lora_weights(model_v2)[k], got[k]) for k in expected)
    assert all(path.startswith(f"/{REPO}/resolve/v1/adapter/") for _, path in hub_online.requests)

    # transformers resolves the revision via repo_info, then downloads by commit id.
    base_dir = tmp_path / "base"
    base().save_pretrained(base_dir)
    api.create_repo("user/base")
    api.upload_folder(repo_id="user/base", folder_path=base_dir)
    api.create_tag("user/base", tag="b1")
    from_hub = transformers.AutoModelForCausalLM.from_pretrained("user/base", revision="b1")
    assert all(torch.equal(a, b) for a, b in zip(base().state_dict().values(), from_hub.state_dict().values()))
    on_hub = peft.PeftModel.from_pretrained(from_hub, REPO, subfolder="adapter", revision="v1")
    assert all(torch.equal(expected[k], v) for k, v in lora_weights(on_hub).items())
