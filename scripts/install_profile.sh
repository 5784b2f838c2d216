#!/usr/bin/env bash
# Install the SLURM profile where Snakemake looks for `--profile slurm` (~/.config/snakemake/slurm),
# as a link to this checkout's profiles/slurm. Safe to run twice (ln -n replaces the link itself
# instead of creating profiles/slurm/slurm inside the repo).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake"
mkdir -p "$target"
if [ -e "$target/slurm" ] && [ ! -L "$target/slurm" ]; then
  echo "$target/slurm exists and is not a link: move it away first" >&2
  exit 1
fi
ln -sfn "$repo/profiles/slurm" "$target/slurm"
echo "profile installed: $target/slurm -> $repo/profiles/slurm (run: snakemake --profile slurm, from $repo)"
