"""The `distributed:` section: validation, mesh sizes against the world, launcher variables, batch split."""
import pytest

from nexus.config import ConfigError, load_config
from nexus.training.distributed.mesh import DistributedConfig, ParallelContext, join_process_group, launch_env


@pytest.mark.parametrize("kwargs,message", [
    ({"strategy": "fsdp"}, r"strategy must be one of ddp, fsdp2, zero, zero\+\+, got 'fsdp'"),
    ({"dp_shard": 0}, "dp_shard must be >= 1 or -1"),
    ({"tp": 0}, "distributed.tp must be >= 1"),
    ({"pp_schedule": "zigzag"}, "pp_schedule must be one of 1f1b, gpipe, interleaved_1f1b"),
    ({"backend": "mpi"}, "backend must be gloo or nccl"),
    ({"strategy": "ddp", "dp_shard": 2}, "use dp_replicate, not dp_shard"),
    ({"strategy": "zero", "zero_stage": 4}, "ZeROConfig.stage must be 1, 2 or 3, got 4"),
    ({"strategy": "zero", "zero_stage": 2, "offload_params": True}, "offload_params needs stage 3"),
    ({"strategy": "zero", "zero_stage": 1, "dp_shard": 2}, r"strategy zero replicates the model"),
    ({"strategy": "zero++", "tp": 2}, r"zero\+\+ runs data parallel only; tp must be 1"),
    ({"zero_plusplus": {"quantize_weights": False}}, r"zero_plusplus is set but strategy is not zero\+\+"),
])
def test_bad_sections_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_sizes_fill_the_world_and_must_multiply_to_it():
    assert DistributedConfig(tp=2).sizes(8) == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}
    assert DistributedConfig(strategy="ddp", pp=2).sizes(8)["dp_replicate"] == 4  # replicas, not shards
    assert DistributedConfig(dp_replicate=2, dp_shard=2).sizes(4)["dp_shard"] == 2
    # ZeRO-1 and ZeRO++ keep whole models (replicas); ZeRO-2/3 shard
    assert DistributedConfig(strategy="zero", zero_stage=1).sizes(4)["dp_replicate"] == 4
    assert DistributedConfig(strategy="zero++").sizes(4)["dp_replicate"] == 4
    assert DistributedConfig(strategy="zero", zero_stage=3).sizes(4)["dp_shard"] == 4
    with pytest.raises(ValueError, match=r"dp_shard 3 x cp 1 x tp 1 = 3 ranks, but the world has 4"):
        DistributedConfig(dp_shard=3).sizes(4)
    with pytest.raises(ValueError, match="= 3 ranks, but the world has 4"):
        DistributedConfig(tp=3).sizes(4)


def test_launch_env_reads_torchrun_then_openmpi(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert launch_env().launcher == "none" and launch_env().world_size == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    env = launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (3, 4, 1, 2, "mpirun")
    # mpirun across machines gives no rendezvous address: say what to export instead of guessing one
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="export MASTER_ADDR"):
        join_process_group()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_env().launcher == "torchrun"  # torchrun's variables win


def test_global_batch_must_split_over_the_data_parallel_ranks(small_run):
    from nexus.training.run import build_dataloaders

    cfg = load_config(small_run("split_batch"))  # batch_size 4
    config = DistributedConfig()
    three = ParallelContext(config=config, sizes=config.sizes(3), rank=0, world_size=3, dp_rank=0, dp_size=3)
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by the 3 data-parallel ranks"):
        build_dataloaders(cfg, three)


def test_run_file_section_is_validated(small_run):
    path = small_run("bad_section")
    path.write_text(path.read_text() + "distributed: {strategy: fsdp2, tensor_parallel: 2}\n")
    with pytest.raises(ConfigError, match="unknown key 'tensor_parallel'"):
        load_config(path)
