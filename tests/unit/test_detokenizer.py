from specserve.routing.detokenizer import IncrementalDetokenizer
from tiny_models import make_tokenizer

TOK = make_tokenizer()


def stream(text, stop=None, step=1):
    ids = TOK(text, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(TOK, stop)
    out = [d.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    out.append(d.flush())
    return out, d


def test_streamed_text_equals_one_shot_decode_including_multibyte():
    text = "Héllo wörld — naïve café 日本語 🙂 done"
    for step in (1, 2, 5):
        pieces, d = stream(text, step=step)
        assert "".join(pieces) == text == d.text
        assert all("\ufffd" not in p for p in pieces)  # never half a character mid-stream


def test_stop_string_truncates_and_holds_back_prefixes():
    pieces, d = stream("The quick brown fox jumps over the lazy dog", stop=["fox j"])
    assert "".join(pieces) == "The quick brown "
    assert d.stopped and d.num_tokens_at_stop <= len(d.token_ids)
    assert d.push([5, 6]) == ""  # nothing after a stop


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end():
    pieces, d = stream("count to fo", stop=["four"])
    assert "".join(pieces) == "count to fo" and not d.stopped
    assert not pieces[-2].endswith("fo")  # "fo" was held back until flush


def test_earliest_of_several_stop_strings_wins():
    pieces, _ = stream("alpha beta gamma delta", stop=["delta", "beta"])
    assert "".join(pieces) == "alpha "
