"""The command line as a user runs it: text and a stats line out, one-line errors."""
from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args, timeout=120, stdin=None):
    return subprocess.run([sys.executable, "-m", "megakernel", *args], capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def test_generate_reference_prints_text_and_stats():
    r = run_cli("generate", "--model", "random:tiny", "--prompt", "Hello",
                "--max-new-tokens", "8", "--backend", "reference")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "ms/token" in lines[-1] and "TTFT" in lines[-1] and "tok/s" in lines[-1]
    assert "generated 8 tok" in lines[-1] or "generated" in lines[-1]
    assert "[reference]" in lines[-1]


def test_generate_matches_api():
    import megakernel

    r = run_cli("generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--quiet",
                "--device", "cpu", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    engine = megakernel.Engine.from_pretrained("random:tiny", device="cpu")
    expected = engine.generate([1, 2, 3], max_new_tokens=5, ignore_eos=True).text
    assert r.stdout == expected + "\n"


def test_json_output_is_the_api_s_result():
    import json

    import megakernel

    r = run_cli("generate", "--prompt", "Hello", "--max-new-tokens", "6", "--ignore-eos",
                "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    expected = megakernel.Engine.from_pretrained("random:tiny", device="cpu").generate(
        "Hello", max_new_tokens=6, ignore_eos=True)
    assert record["token_ids"] == expected.token_ids and record["text"] == expected.text
    assert record["prompt_token_ids"] == expected.prompt_token_ids
    assert record["finish_reason"] == "length"
    assert record["stats"]["new_tokens"] == 6 and record["stats"]["ms_per_token"] > 0
    one = run_cli("generate", "--prompt", "Hello", "--max-new-tokens", "1", "--device", "cpu",
                  "--json", "--quiet")
    assert one.returncode == 0 and one.stderr == ""
    assert json.loads(one.stdout)["stats"]["ms_per_token"] is None     # strict JSON: no NaN


def test_stop_string_ends_the_text_before_it():
    import megakernel

    engine = megakernel.Engine.from_pretrained("random:tiny", device="cpu")
    full = engine.generate("Hello", max_new_tokens=30, ignore_eos=True).text
    stop = full[8:11]
    r = run_cli("generate", "--prompt", "Hello", "--max-new-tokens", "30", "--quiet",
                "--device", "cpu", "--ignore-eos", "--stop", "\x01never", "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout == full[:full.find(stop)] + "\n"


def test_prompt_from_a_file_or_stdin(tmp_path):
    prompt = "Hello,\nwörld"
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    common = ["--max-new-tokens", "5", "--quiet", "--device", "cpu", "--ignore-eos"]
    expected = run_cli("generate", "--prompt", prompt, *common)
    assert expected.returncode == 0, expected.stderr
    from_file = run_cli("generate", "--prompt-file", str(tmp_path / "p.txt"), *common)
    from_stdin = run_cli("generate", "--prompt-file", "-", *common, stdin=prompt)
    assert from_file.stdout == from_stdin.stdout == expected.stdout


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "empty"),
    (["--prompt-file", "/no/such/file"], "cannot read --prompt-file '/no/such/file'"),
    (["--prompt-file", "/dev/null"], "empty"),
    (["--prompt", "hi", "--model", "/no/such/dir"], "does not exist"),
    (["--prompt", "hi", "--model", "random:nope"], "nope"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1,99999"], "out of range"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "2"], "top_p"),
    (["--prompt", "hi", "--top-k", "-3"], "top_k"),
    (["--prompt", "hi", "--max-seq-len", "8", "--max-new-tokens", "20"], "max_seq_len"),
    (["--prompt", "hi", "--chat"], "chat template"),
    (["--prompt", "hi", "--dtype", "int8"], "dtype"),
    (["--prompt", "hi", "--backend", "reference", "--device", "cuda"], "cuda"),
    (["--prompt", "hi", "--steps-per-launch", "0"], "steps_per_launch"),
    (["--prompt", "hi", "--max-seq-len", "4097"], "exceeds the model's max_position_embeddings"),
])
def test_errors_are_one_line_without_traceback(args, message):
    r = run_cli("generate", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and message.lower() in err[0].lower(), r.stderr


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import torch

    import megakernel
    from megakernel.cli import main

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.\n"
                                     "See the allocator's documentation.")

    monkeypatch.setattr(megakernel.Engine, "from_pretrained", exhausted)
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: out of memory: CUDA out of memory. Tried to allocate 9.00 GiB."


def test_a_closed_stdout_ends_quietly():
    """`megakernel generate ... | head -c 5`: the reader leaves, the command ends with
    SIGPIPE's status and no error or traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "megakernel", "generate", "--prompt", "hi",
                             "--max-new-tokens", "400", "--ignore-eos", "--device", "cpu",
                             "--max-seq-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"error" not in err, err


def test_version_names_torch_and_the_backend():
    import torch

    import megakernel

    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"megakernel {megakernel.__version__} (torch {torch.__version__}; ")
    usable, reason = megakernel.megakernel_available()
    assert ("megakernel backend usable on" in r.stdout) == usable
    assert reason in r.stdout


def test_megakernel_backend_without_cuda_is_a_clear_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_cli("generate", "--prompt", "hi", "--backend", "megakernel")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "megakernel" in r.stderr and "CUDA" in r.stderr


def test_program_subcommand():
    r = run_cli("program", "--model", "random:llama-3.2-1b", "--num-sms", "132")
    assert r.returncode == 0, r.stderr
    assert "rms_qkv_rope" in r.stdout and "argmax_reduce" in r.stdout
    assert "bytes moved per step" in r.stdout
    # The 16 layers' counters, alike, are written once.
    assert "L0-L15 each: qkv=" in r.stdout and "L1." not in r.stdout
    r = run_cli("program", "--model", "random:tiny", "--num-sms", "4", "--list")
    assert r.returncode == 0 and r.stdout.count("rms_lm_head") >= 2
    assert "attention_reduce" in r.stdout and "positions from 192 on" in r.stdout
    r = run_cli("program", "--model", "random:tiny", "--num-sms", "4", "--list",
                "--whole-context")
    assert r.returncode == 0 and "attention_reduce" not in r.stdout
    assert r.stdout.count("attention_partial") >= 2
    r = run_cli("program", "--model", "random:tiny", "--num-sms", "1")
    assert r.returncode == 0 and "decodes every position" in r.stdout


def test_ctrl_c_stops_cleanly():
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "megakernel", "generate", "--prompt", "Hi",
                             "--backend", "reference", "--max-new-tokens", "3000",
                             "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until text is streaming (generation has started), then interrupt.
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if proc.stdout.read(1):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


def chat_checkpoint(path):
    """random:tiny's weights with a tokenizer whose chat template is <role>content<eot>."""
    from conftest import make_hf_tokenizer
    from megakernel.loading import save_pretrained
    from megakernel.presets import PRESETS, random_weights
    from megakernel.tokenizer import HFTokenizer

    make_hf_tokenizer(chat=True).save_pretrained(path / "tok")
    return save_pretrained(random_weights(PRESETS["tiny"]), path / "ckpt",
                           tokenizer=HFTokenizer(path / "tok"))


def test_chat_keeps_earlier_turns_in_the_cache(tmp_path):
    import megakernel

    ckpt = chat_checkpoint(tmp_path)
    r = run_cli("chat", "--model", ckpt, "--device", "cpu", "--max-new-tokens", "6",
                "--ignore-eos", "--system", "be brief",
                stdin="hello world\n\nthe quick fox\n/reset\nhello world\n")
    assert r.returncode == 0, r.stderr
    stats = [l for l in r.stderr.splitlines() if "ms/token" in l]
    assert len(stats) == 3 and "cached" not in stats[0] and "cached" in stats[1]
    assert "(conversation cleared)" in r.stderr
    # The replies, each ended by a newline, are what the API's chat session gives; after
    # /reset the first turn's again.
    engine = megakernel.Engine.from_pretrained(ckpt, device="cpu")
    chat = engine.chat_session(system="be brief")
    first, second = (chat.send(m, max_new_tokens=6, ignore_eos=True).text
                     for m in ["hello world", "the quick fox"])
    assert r.stdout == f"{first}\n{second}\n{first}\n"


def test_chat_errors():
    r = run_cli("chat", "--model", "random:tiny", stdin="hi\n")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [
        "error: this model's tokenizer has no chat template: a chat session needs one"]


def test_a_bad_chat_turn_prints_its_error_and_the_chat_goes_on(tmp_path):
    ckpt = chat_checkpoint(tmp_path)
    r = run_cli("chat", "--model", ckpt, "--device", "cpu", "--max-seq-len", "64",
                "--max-new-tokens", "4", "--ignore-eos",
                stdin="hello " * 40 + "\nhello\n")
    assert r.returncode == 0, r.stderr
    assert "error: the conversation" in r.stderr and "exceeds max_seq_len 64" in r.stderr
    assert sum("ms/token" in l for l in r.stderr.splitlines()) == 1


def test_ctrl_c_stops_a_chat_reply_and_the_chat_goes_on(tmp_path):
    import signal
    import time

    ckpt = chat_checkpoint(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "megakernel", "chat", "--model", ckpt,
                             "--device", "cpu", "--max-new-tokens", "1500",
                             "--max-seq-len", "4096", "--ignore-eos"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write("hello world\n")
    proc.stdin.flush()
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if proc.stdout.read(1):      # the reply is streaming
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out, err = proc.communicate("/reset\nhello world\n", timeout=120)
    assert proc.returncode == 0, err
    assert "reply interrupted" in err and "(conversation cleared)" in err
    assert "Traceback" not in err
    # The next turn runs whole: one stats line, 1500 tokens.
    stats = [l for l in err.splitlines() if "ms/token" in l]
    assert len(stats) == 1 and "generated 1500 tok" in stats[0]
