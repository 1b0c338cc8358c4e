"""scaleout.py: release_pages gives back a copied block's pages of a memory-mapped checkpoint."""
import copy
import json

import torch

from checkpoints import meta_state_dict
from llama import LINEARS, ModelArgs, Transformer, build
from scaleout import release_pages


def test_release_pages_drops_a_copied_block_of_a_mmapped_checkpoint(tmp_path):
    """release_pages: the resident file-backed memory falls by about the block's linear weights
    (madvise on the mmap'd checkpoint), and the weights read back unchanged from the file."""
    def rss_file_mib():
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("RssFile:")).split()[1]) / 1024
    params = dict(dim=512, n_layers=2, n_heads=4, vocab_size=256, multiple_of=256, norm_eps=1e-5)
    torch.manual_seed(0)
    torch.save(Transformer(ModelArgs(**params)).state_dict(), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    args, sd = meta_state_dict(tmp_path)                                       # load() without a tokenizer
    model = build(args, sd, dtype=None)
    block = model.layers[0]
    before = {n: block.get_submodule(n).weight.clone() for n in LINEARS}       # touches every page
    mib = sum(w.numel() * 4 for w in before.values()) / 2**20
    resident = rss_file_mib()
    release_pages(block)
    assert resident - rss_file_mib() > 0.8 * mib, (resident, rss_file_mib(), mib)
    for n in LINEARS:
        assert torch.equal(block.get_submodule(n).weight, before[n])
    anon = copy.deepcopy(model.layers[1])                                       # not file-backed: untouched
    kept = {n: anon.get_submodule(n).weight.clone() for n in LINEARS}
    release_pages(anon)
    assert all(torch.equal(anon.get_submodule(n).weight, kept[n]) for n in LINEARS)
