#!/usr/bin/env bash
# Short runs of both stages (discriminator on, resume, --text-cache off, grad accumulation, DiT and DiT-T2I), then the
# sha1 of every weight file, latent cache and log (throughput columns removed). Run it on two checkouts to show a
# change left training bit-identical:  bash bench/same_runs.sh OUT > a.txt; (other checkout) ...; diff a.txt b.txt
set -euo pipefail
out=$(realpath -m "${1:-/tmp/textok-same-runs}")
cd "$(dirname "$0")/.."
rm -rf "$out" && mkdir -p "$out"
export OMP_NUM_THREADS=1
exec 3>&1 >"$out/runs.log" 2>&1  # the runs' output to a log; the hashes to stdout
tok=(--stage tokenizer --cache-dir "$out/cache" --num-images 256 --workers 0)
gan=(--disc-start 12 --r1-every 2 --eval-every 12 --ckpt-every 12)
python train.py "${tok[@]}" "${gan[@]}" --out "$out/tok" --max-steps 24
python train.py "${tok[@]}" "${gan[@]}" --out "$out/tokres" --max-steps 12
python train.py "${tok[@]}" "${gan[@]}" --out "$out/tokres" --max-steps 24 --resume
python train.py "${tok[@]}" --out "$out/tokoff" --max-steps 8 --text-cache off --grad-accum 2
dit=(--stage dit --tokenizer "$out/tok/tokenizer" --cache-dir "$out/cache" --num-images 256 --workers 0)
python train.py "${dit[@]}" --out "$out/dit" --max-steps 16 --ckpt-every 8 --grad-accum 2
python train.py "${dit[@]}" --out "$out/t2i" --task t2i --max-steps 8 --text-cache off
cd "$out"
exec 1>&3
for f in $(find . -name "*.safetensors" -o -name "Z.npy" | sort); do sha1sum "$f"; done
for f in $(find . -name log.jsonl | sort); do
  echo "$(sed -E 's/, "(img|latents)_per_s": [0-9.e+-]+//' "$f" | sha1sum | cut -c1-40)  $f (without throughput)"
done
