#!/usr/bin/env bash
# Where environment B's fairseq source is (used by scripts/run_tests.sh and scripts/install_env_b.sh).
#
#   bash scripts/fairseq_source.sh     # prints the absolute path of the source and exits 0
#
# The source is a fairseq source archive (.tar.gz, .tar, .zip) or a checkout directory:
#   - CMD_PLUGIN_FAIRSEQ_SRC names it; if it names nothing that exists: exit 1 (a wrong path is an error);
#   - else fairseq-main-3d262bb.tar.gz in ../shared/vendor/ beside this clone, if it is there (the
#     layout of the project's CI machine);
#   - else there is none: exit 3, saying how to give one (environment B cannot be built).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEFAULT=$ROOT/../shared/vendor/fairseq-main-3d262bb.tar.gz

if [ -n "${CMD_PLUGIN_FAIRSEQ_SRC:-}" ]; then
  if [ ! -e "$CMD_PLUGIN_FAIRSEQ_SRC" ]; then
    echo "CMD_PLUGIN_FAIRSEQ_SRC=$CMD_PLUGIN_FAIRSEQ_SRC: no such file or directory (expected a fairseq" \
         "source archive or checkout)" >&2
    exit 1
  fi
  src=$CMD_PLUGIN_FAIRSEQ_SRC
elif [ -e "$DEFAULT" ]; then
  src=$DEFAULT
else
  echo "no fairseq source for environment B: set CMD_PLUGIN_FAIRSEQ_SRC to a fairseq source archive or" \
       "checkout (the one tested: fairseq main at commit 3d262bb, e.g." \
       "CMD_PLUGIN_FAIRSEQ_SRC=/path/to/fairseq-main-3d262bb.tar.gz)" >&2
  exit 3
fi
# absolute, so that it stays valid for scripts that change directory
echo "$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"
