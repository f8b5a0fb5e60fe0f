# Environment of a lent GPU machine (sourced by bench/gpu_session.sh and bench/gpu_campaign.sh): carried wheels on
# PYTHONPATH (triton 3.7.1 first: fla's GDN backward needs it on Hopper), offline, caches in /tmp, no NVLink multicast.
export PYTHONPATH=/tmp/tsite:/tmp/site
# (a value set before, even empty, is kept: CPU dry runs of the campaigns point these at the local install)
export DS_HYBRID_CACHE=${DS_HYBRID_CACHE-/tmp/dsh} TRITON_CACHE_DIR=/tmp/tcache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DS_HYBRID_SMOLLM2_GGUF=${DS_HYBRID_SMOLLM2_GGUF-/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4
export PATH=$HOME/.local/bin:$PATH
