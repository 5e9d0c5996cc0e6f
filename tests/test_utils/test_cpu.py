"""mlla_mm.utils.cpu.bf16_fast_on_this_cpu: AMX / AVX512-BF16 detection from cpuinfo."""
from mlla_mm.utils.cpu import bf16_fast_on_this_cpu

AVX2_EPYC = '''processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2 sha_ni
'''

SPR = '''processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
'''

ZEN4 = '''processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni
'''

SKYLAKE_AVX512 = '''processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_vnni
'''


def test_avx2_only_is_slow_and_named():
    fast, desc = bf16_fast_on_this_cpu(AVX2_EPYC)
    assert fast is False
    assert 'AMD EPYC' in desc and 'amx_bf16' in desc and 'avx512_bf16' in desc


def test_amx_is_fast():
    fast, desc = bf16_fast_on_this_cpu(SPR)
    assert fast is True
    assert 'Platinum 8480+' in desc and 'amx_bf16' in desc and 'avx512_bf16' in desc


def test_avx512_bf16_without_amx_is_fast():
    fast, desc = bf16_fast_on_this_cpu(ZEN4)
    assert fast is True
    assert 'avx512_bf16' in desc and 'amx' not in desc


def test_plain_avx512_is_not_enough():
    fast, _ = bf16_fast_on_this_cpu(SKYLAKE_AVX512)
    assert fast is False


def test_flag_substrings_do_not_count():
    text = 'model name\t: X\nflags\t\t: avx2 avx512_bf16x amx_bf16_foo\n'
    assert bf16_fast_on_this_cpu(text)[0] is False


def test_no_cpuinfo_falls_back_to_torch():
    fast, desc = bf16_fast_on_this_cpu('')
    assert isinstance(fast, bool)
    assert 'torch CPU capability' in desc


def test_this_machine_matches_torch_detection():
    import torch
    fast, _ = bf16_fast_on_this_cpu()
    assert fast == (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


# --------------------------------------------------------------------------
# The CPU line of the benchmarks (mlla_mm.utils.cpu.cpu_description / cpu_line): the one cpuinfo reader.
# --------------------------------------------------------------------------
def test_cpu_line_names_the_cpu_and_its_bf16_vnni_amx_flags():
    from mlla_mm.utils.cpu import cpu_description, cpu_line
    line = cpu_line(SPR)
    assert line.startswith('CPU: Intel(R) Xeon(R) Platinum 8480+ (avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8;')
    assert line.endswith('bf16 native, VNNI yes, AMX yes)')
    assert cpu_line(ZEN4).endswith('(avx2 avx512f avx512_bf16 avx512_vnni; bf16 native, VNNI yes, AMX no)')
    assert cpu_line(AVX2_EPYC) == 'CPU: AMD EPYC (avx2; bf16 emulated, VNNI no, AMX no)'
    skylake = cpu_description(SKYLAKE_AVX512)
    assert skylake['flags'] == ['avx2', 'avx512f', 'avx512_vnni'] and skylake['vnni'] and not skylake['native_bf16']


def test_this_machines_description_agrees_with_the_bf16_check():
    from mlla_mm.utils.cpu import cpu_description
    cpu = cpu_description()
    assert isinstance(cpu['model_name'], str) and cpu['model_name']
    assert (cpu['native_bf16'], cpu['bf16_note']) == bf16_fast_on_this_cpu()
    assert cpu['native_bf16'] == any(f in cpu['flags'] for f in ('avx512_bf16', 'amx_bf16')) or not cpu['flags']
