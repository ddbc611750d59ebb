# Sourced by the GPU machine's scripts (bench/device_kernels.sh, bench/gpu_e2e.sh), from the repo
# root: wheels the image lacks (from .whl/, into /tmp/site), then rustinfer and its plugins.
# Exits the calling script when either install fails: nothing after it works without them.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation \
  . ./plugins/ops_cpu ./plugins/models_llama3 ./plugins/models_qwen ./plugins/ops_cuda \
  || { echo "installing rustinfer and its plugins failed" >&2; exit 1; }
