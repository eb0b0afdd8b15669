"""Build a corpus as WebDataset shards, or import one split of an image data set.

    python jobs/make_corpus.py                      # the embedded synthetic benchmark (cached)
    python jobs/make_corpus.py corpus.n_pretrain=2000 --out corpus.json
    python jobs/make_corpus.py --from-imagefolder imagenet/val --class-names imagenet \\
        --templates openai --dest s3://bucket/corpus/imagenet --split test
    python jobs/make_corpus.py --from-hf cifar10_saved --hf-split train --split fewshot

Each import writes one split (run it again for another split; the classes must agree). A
CLIP_benchmark WebDataset directory (classnames.txt, <split>/nshards.txt, <split>/0.tar ...) needs no
conversion: give it as the corpus directly.
"""
import sys

from pipeline.cli import main
from pipeline.jobs import make_corpus


def _args(p):
    g = p.add_argument_group("importing a data set (one split per run)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--from-imagefolder", metavar="DIR",
                     help="convert an ImageFolder-style directory (one sub-folder per class; path "
                          "or URI)")
    src.add_argument("--from-hf", metavar="PATH",
                     help="convert a Hugging Face data set: a save_to_disk directory (Dataset or "
                          "DatasetDict), a parquet file or a directory of parquet files")
    g.add_argument("--dest", metavar="CORPUS",
                   help="corpus to write into, path or URI (default: <paths.root>/corpus/<source "
                        "name>); an existing corpus gets the split added")
    g.add_argument("--split", default="test", help="destination split name (default: test)")
    g.add_argument("--hf-split", metavar="NAME",
                   help="split of the Hugging Face data set to read (needed when it has several)")
    g.add_argument("--image-column", metavar="NAME",
                   help="HF image column (default: the first Image feature)")
    g.add_argument("--label-column", metavar="NAME",
                   help="HF label column (default: the first ClassLabel feature)")
    g.add_argument("--class-names", metavar="SPEC",
                   help="'imagenet' (open_clip's 1000 names, for synset folders), or a file: one "
                        "name per line in sorted-folder order, 'folder name' lines, or JSON "
                        "(default: folder / ClassLabel names, '_' as space)")
    g.add_argument("--templates", metavar="SPEC",
                   help="prompt templates: 'openai' (80 CLIP ImageNet templates), 'simple', or a "
                        "file with one template per line ({} or {c} for the class); default: "
                        "'a photo of a {}.' (an existing corpus keeps its own)")


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], make_corpus, extra_args=_args))
