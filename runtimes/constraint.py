"""Constrained decoding: a request's grammar as a token mask on its batch row's logits, with a budget
that lets the grammar end within the request's tokens.

A grammar is written in llguidance's Lark dialect (it embeds JSON schemas as `%json {...}` and names
special tokens as `<[ID]>`; runtimes/json_grammar.py makes one from a schema). llguidance is an
optional dependency, imported only when a grammar is asked for. Per engine one `Grammars` builds
llguidance's tokenizer from ours once, lazily; per constrained request one `Constraint` holds an
LLMatcher, built at admission, and a *closing path*: token ids that complete the grammar from the
matcher's state (the grammar's stop, or EOS where it may end).

The budget rule keeps the guarantee that a constrained request always ends complete: it is admitted
only with a closing path within its token budget, and a sampled token is taken only if, after it,
a closing path fits in the tokens left; otherwise that token is masked and the choice is made again,
and after MAX_REJECTIONS the closing path's next token is taken. So every constrained request ends
with its grammar complete (finish reason "grammar", OpenAI's "stop") or at EOS where the grammar
allows it, never cut by its token limit. Rows without a grammar never reach this module.
"""
from __future__ import annotations

import threading

import numpy as np

from mixtral_export.runtimes.requests import OptionError

MAX_REJECTIONS = 4  # sampled tokens refused for the budget before the closing path's next token is taken
ENCODED_CACHE = 4096  # forced texts whose ids are remembered per engine
SEARCH_CAP = 4096  # tokens a closing path is looked for at most, to name what a refused grammar needs
# Single characters tried, in order, to close a grammar (after its forced text): end a string, close
# an object or array, the shortest values. Anything else falls back to the lowest allowed token id.
CLOSERS = ('"', "}", "]", "0", "[", "{", "n", "t", "f")


class GrammarError(OptionError):
    """A grammar that does not compile, or cannot end within the request's tokens."""

    def __init__(self, message: str):
        super().__init__(message, "grammar")


def llguidance_module():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise OptionError("a grammar (structured output) needs llguidance: pip install 'mixtral-export[serve]'",
                          "grammar") from None
    return llguidance


class Grammars:
    """One engine's (or engine client's) grammar compiler over the artifact's tokenizer
    (mixtral_export/tokenizer.py): llguidance's tokenizer is built on the first grammar, once."""

    def __init__(self, tokenizer, vocab_size: int):
        """`vocab_size`: the model's (its logits' width), at least the tokenizer's."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._built = None  # (LLTokenizer, closer token ids), made on first use

    def built(self):
        with self._lock:
            if self._built is None:
                if self.tokenizer.vocab_size > self.vocab_size:
                    raise OptionError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the model's "
                                      f"{self.vocab_size} logits: grammars cannot mask it", "grammar")
                lltokenizer = ll_tokenizer(llguidance_module(), self.tokenizer, self.vocab_size)
                closers = [ids[0] for ids in map(self.tokenizer.encode_verbatim, CLOSERS) if len(ids) == 1]
                self._built = lltokenizer, closers
            return self._built

    def constraint(self, grammar: str, budget: int) -> "Constraint":
        """A matcher for `grammar` with a closing path within `budget` tokens; GrammarError otherwise."""
        llguidance = llguidance_module()
        lltokenizer, closers = self.built()
        matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0,
                                       limits=llguidance.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise GrammarError(f"grammar: {one_line(matcher.get_error())}")
        constraint = Constraint(matcher, lltokenizer.eos_token, closers, self.vocab_size, budget)
        if constraint.path is None:
            shortest = constraint.closing_path(SEARCH_CAP)
            need = "no way to end was found" if shortest is None else f"it needs at least {len(shortest)}"
            raise GrammarError(f"the grammar cannot end within {budget} tokens (max_tokens, or the position "
                               f"limit): {need}")
        return constraint


def one_line(message: str) -> str:
    return " ".join(message.split())


def ll_tokenizer(llguidance, tokenizer, vocab_size: int):
    """llguidance's view of a sentencepiece tokenizer: each id's bytes ("\u2581" as a space, byte pieces as
    their byte), control and unknown pieces as special tokens (0xFF + their name, as llguidance marks
    them), ids past the tokenizer's up to the model's vocabulary as never allowed, and an encoder
    without sentencepiece's dummy-prefix space (forced text is mid-output)."""
    tokens, special = [], []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.token_bytes(i)
        if text is None:
            text = b"\xff" + tokenizer.sp.id_to_piece(i).encode()
            special.append(i)
        tokens.append(text)

    class Vocabulary:  # what llguidance.TokenizerWrapper reads
        eos_token_id, bos_token_id, special_token_ids = tokenizer.eos_id, tokenizer.bos_id, special

        def __init__(self):
            self.tokens = tokens
            self.encoded: dict[str, list[int]] = {}  # forced texts (keys, literals) recur every step

        def __call__(self, text: str | bytes) -> list[int]:  # llguidance passes UTF-8 bytes
            ids = self.encoded.get(text)
            if ids is None:
                if len(self.encoded) >= ENCODED_CACHE:
                    self.encoded.clear()
                ids = self.encoded[text] = tokenizer.encode_verbatim(text)
            return ids

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=vocab_size)


def closing_path(matcher, cap: int, closers: list[int], eos: int, mask: np.ndarray) -> list[int] | None:
    """Token ids that complete the grammar from the matcher's state (the state is left as it was):
    its forced tokens, else the first of `closers` after which it may end, else the first it allows,
    else its lowest allowed id, until it stops (or, where it may end, EOS). None when no path of at most `cap` tokens was found. `mask`:
    a (1, W) int32 bitmask buffer of the vocabulary."""
    from llguidance.numpy import fill_next_token_bitmask

    path: list[int] = []
    consumed = 0
    try:
        while len(path) <= cap:
            if matcher.is_error():
                return None
            if matcher.is_stopped():
                break
            if matcher.is_accepting():
                path.append(eos)
                break
            forced = matcher.compute_ff_tokens()
            taken = matcher.try_consume_tokens(forced) if forced else 0
            if taken:
                path += forced[:taken]
                consumed += taken
                continue
            token = next((t for t in closers if ends_after(matcher, t)), None)
            if token is None:
                token = next((t for t in closers if matcher.try_consume_tokens([t]) == 1), None)
            if token is None:
                fill_next_token_bitmask(matcher, mask)
                allowed = np.flatnonzero(unpack(mask[0]))
                allowed = allowed[allowed != eos]
                if not allowed.size or matcher.try_consume_tokens([int(allowed[0])]) != 1:
                    return None
                token = int(allowed[0])
            path.append(token)
            consumed += 1
    finally:
        matcher.rollback(consumed)
    return path if len(path) <= cap else None


def ends_after(matcher, token: int) -> bool:
    """Consume `token` if the grammar may end right after it; else leave the state as it was."""
    if matcher.try_consume_tokens([token]) != 1:
        return False
    if matcher.is_stopped() or matcher.is_accepting():
        return True
    matcher.rollback(1)
    return False


def unpack(words: np.ndarray) -> np.ndarray:
    """llguidance's bitmask row (W,) int32 -> (32 W,) bool, bit i of word j = token 32 j + i."""
    return np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)


class Constraint:
    """One request's grammar state: what it allows next, whether it is complete, and a closing path
    that fits the tokens it has left."""

    def __init__(self, matcher, eos: int, closers: list[int], vocab_size: int, budget: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self.eos, self.closers, self.vocab_size = matcher, eos, closers, vocab_size
        self.left = budget  # tokens the request may still generate
        self.mask = allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32
        self.path = self.closing_path(budget)

    def closing_path(self, cap: int) -> list[int] | None:
        return closing_path(self.matcher, cap, self.closers, self.eos, self.mask)

    @property
    def complete(self) -> bool:
        """The grammar admits nothing more (it stopped, or took EOS)."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar allows next."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.mask)
        return unpack(self.mask[0])[:self.vocab_size]

    def take(self, token: int) -> bool:
        """Commit an allowed token if a closing path still fits after it (True), else leave the state as
        it was (False)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} it had allowed: {one_line(self.matcher.get_error())}")
        path = self.closing_path(self.left - 1)
        if self.path and token == self.path[0] and (path is None or len(path) > len(self.path) - 1):
            path = self.path[1:]  # the path in hand still closes
        if path is None:
            self.matcher.rollback(1)
            return False
        self.path, self.left = path, self.left - 1
        return True

    def close(self) -> int:
        """Commit the closing path's next token (it always fits) and return it."""
        token, self.path = self.path[0], self.path[1:]
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused its own closing token {token}: "
                               f"{one_line(self.matcher.get_error())}")
        self.left -= 1
        return token


def constrained_token(sampler, logits: np.ndarray, history: list[int], constraint: Constraint) -> int:
    """One constrained row's next token from its logits (1, V): the sampler's penalties and bias, then
    the grammar's mask (disallowed = -inf), then its choice (greedy or a draw), under the budget rule."""
    if constraint.path and len(constraint.path) >= constraint.left:
        return constraint.close()  # no slack: only the closing path is sure to fit
    scores = sampler.scores(logits, [history])  # (1, V) float32
    scores[0, ~constraint.allowed()] = -np.inf
    for _ in range(MAX_REJECTIONS):
        token = int(sampler.choose(scores)[0])
        if constraint.take(token):
            return token
        scores[0, token] = -np.inf
    return constraint.close()
