//! AMQP topic patterns: validation with bounds, matching in time linear in
//! the topic (no recursion, no backtracking), and whether one pattern lies
//! inside another. Patterns come from clients, so every function here does
//! bounded work whatever it is given.
//!
//! Words are separated by `.`; in a pattern `*` stands for exactly one word
//! and `#` for zero or more.

/// Most words in any pattern the gateway stores (rules and subscriptions).
pub(crate) const MAX_PATTERN_WORDS: usize = 32;
/// Most words in a client's subscription pattern (bff-contract.md section 4).
pub(crate) const MAX_SUBSCRIPTION_WORDS: usize = 16;
/// Most `#` in a client's subscription pattern.
pub(crate) const MAX_SUBSCRIPTION_HASHES: usize = 2;
/// An AMQP routing key is at most 255 bytes.
pub(crate) const MAX_TOPIC_BYTES: usize = 255;

/// A word of a topic or pattern: letters, digits, `_` or `-`.
fn is_word(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 200
        && w.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// A pattern's words, split once onto the stack.
struct Words<'a> {
    words: [&'a str; MAX_PATTERN_WORDS],
    len: usize,
}

impl<'a> Words<'a> {
    /// `None` when the pattern has more words than any valid one.
    fn split(pattern: &'a str) -> Option<Self> {
        let mut words = [""; MAX_PATTERN_WORDS];
        let mut len = 0;
        for w in pattern.split('.') {
            *words.get_mut(len)? = w;
            len += 1;
        }
        Some(Self { words, len })
    }

    fn as_slice(&self) -> &[&'a str] {
        &self.words[..self.len]
    }
}

/// A pattern of the routing file: dot-separated words, each a word, `*` or
/// `#`, at most [`MAX_PATTERN_WORDS`] of them.
pub(crate) fn validate_pattern(p: &str) -> Result<(), String> {
    let words_ok = !p.is_empty() && p.split('.').all(|w| w == "*" || w == "#" || is_word(w));
    if !words_ok {
        return Err(format!(
            "must be dot-separated words of letters, digits, `_` or `-`, or `*` / `#`, found `{}`",
            preview(p)
        ));
    }
    if p.split('.').count() > MAX_PATTERN_WORDS || p.len() > MAX_TOPIC_BYTES {
        return Err(format!(
            "must have at most {MAX_PATTERN_WORDS} words and {MAX_TOPIC_BYTES} bytes"
        ));
    }
    Ok(())
}

/// A client's subscription pattern: a valid pattern with at most
/// [`MAX_SUBSCRIPTION_WORDS`] words and [`MAX_SUBSCRIPTION_HASHES`] `#`.
pub(crate) fn validate_subscription(p: &str) -> Result<(), String> {
    if p.len() > MAX_TOPIC_BYTES {
        return Err(format!("is longer than {MAX_TOPIC_BYTES} bytes"));
    }
    validate_pattern(p)?;
    let words = p.split('.').count();
    if words > MAX_SUBSCRIPTION_WORDS {
        return Err(format!(
            "`{p}` has {words} words; at most {MAX_SUBSCRIPTION_WORDS} are allowed"
        ));
    }
    let hashes = p.split('.').filter(|w| *w == "#").count();
    if hashes > MAX_SUBSCRIPTION_HASHES {
        return Err(format!(
            "`{p}` has {hashes} `#`; at most {MAX_SUBSCRIPTION_HASHES} are allowed"
        ));
    }
    Ok(())
}

/// At most 64 characters of client input, for error messages.
pub(crate) fn preview(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out.escape_debug().to_string()
}

/// Does `topic` match `pattern`? A pattern longer than
/// [`MAX_PATTERN_WORDS`] matches nothing.
///
/// The shapes nearly every subscription has, a literal topic and a literal
/// prefix followed by `.#`, are compared as bytes: a fan-out matches every
/// subscribed session's patterns against its topic. Any other pattern is
/// run as an automaton ([`matches_any_pattern`]).
pub(crate) fn matches(pattern: &str, topic: &str) -> bool {
    let (head, any_tail) = match pattern.strip_suffix(".#") {
        Some(head) => (head, true),
        None => (pattern, false),
    };
    let mut dots = 0;
    for b in head.bytes() {
        match b {
            b'*' | b'#' => return matches_any_pattern(pattern, topic),
            b'.' => dots += 1,
            _ => {}
        }
    }
    // Words: the head's, and the `#` after it.
    if dots + 1 + usize::from(any_tail) > MAX_PATTERN_WORDS {
        return false;
    }
    if any_tail {
        // `#` matches zero words too: the head alone is a match.
        topic
            .strip_prefix(head)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    } else {
        head == topic
    }
}

/// [`matches`] for any pattern: a simulation of the pattern's automaton,
/// the set of pattern positions reachable after each topic word, kept in a
/// bit set. O(words of topic x words of pattern); a pattern longer than
/// [`MAX_PATTERN_WORDS`] matches nothing.
fn matches_any_pattern(pattern: &str, topic: &str) -> bool {
    let Some(words) = Words::split(pattern) else {
        return false;
    };
    let p = words.as_slice();
    let close = |mut set: u64| {
        // `#` may match no word: a position before `#` also reaches the
        // one after it. In order, so runs of `#` close in one pass.
        for (i, w) in p.iter().enumerate() {
            if set & (1 << i) != 0 && *w == "#" {
                set |= 1 << (i + 1);
            }
        }
        set
    };
    let mut set = close(1);
    for word in topic.split('.') {
        let mut next = 0u64;
        for (i, w) in p.iter().enumerate() {
            if set & (1 << i) == 0 {
                continue;
            }
            match *w {
                "#" => next |= 1 << i,
                "*" => next |= 1 << (i + 1),
                lit if lit == word => next |= 1 << (i + 1),
                _ => {}
            }
        }
        set = close(next);
        if set == 0 {
            return false;
        }
    }
    set & (1 << p.len()) != 0
}

/// Does `outer` match every topic `inner` matches? Decided token by token
/// (each token of `outer` covers a run of `inner`'s): sound, and exact for
/// the patterns clients write; where it cannot tell (`*.#` inside `#.*`)
/// it says no, which refuses a subscription rather than widening one.
/// O(words x words).
pub(crate) fn covers(outer: &str, inner: &str) -> bool {
    let (Some(o), Some(i)) = (Words::split(outer), Words::split(inner)) else {
        return false;
    };
    let (o, i) = (o.as_slice(), i.as_slice());
    // reach[a][b]: outer's first `a` tokens cover inner's first `b` tokens.
    let mut reach = [[false; MAX_PATTERN_WORDS + 1]; MAX_PATTERN_WORDS + 1];
    reach[0][0] = true;
    for a in 0..=o.len() {
        for b in 0..=i.len() {
            if !reach[a][b] {
                continue;
            }
            let Some(&ow) = o.get(a) else { continue };
            match ow {
                "#" => {
                    // `#` covers nothing more, or one more token of any kind.
                    reach[a + 1][b] = true;
                    if b < i.len() {
                        reach[a][b + 1] = true;
                    }
                }
                "*" => {
                    if i.get(b).is_some_and(|iw| *iw != "#") {
                        reach[a + 1][b + 1] = true;
                    }
                }
                lit => {
                    if i.get(b).is_some_and(|iw| *iw == lit) {
                        reach[a + 1][b + 1] = true;
                    }
                }
            }
        }
    }
    reach[o.len()][i.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook recursive matcher, exponential on repeated `#`: the
    /// reference on small inputs.
    fn reference(pattern: &str, topic: &str) -> bool {
        fn go(p: &[&str], t: &[&str]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((&"#", rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
                Some((&w, rest)) => match t.split_first() {
                    Some((&tw, trest)) => (w == "*" || w == tw) && go(rest, trest),
                    None => false,
                },
            }
        }
        let p: Vec<&str> = pattern.split('.').collect();
        let t: Vec<&str> = topic.split('.').collect();
        go(&p, &t)
    }

    #[test]
    fn matching_follows_amqp() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.c"));
        assert!(matches("a.#", "a"));
        assert!(matches("a.#", "a.b.c"));
        assert!(matches("#", "x.y"));
        assert!(matches("#.z", "x.y.z"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("#.#.a.#", "a"));
        assert!(!matches("a", "b"));
        // Empty words (no valid pattern has one) match as the automaton
        // has them: `.#` is the empty word, then anything.
        assert!(matches(".#", ""));
        assert!(matches(".#", ".x"));
        assert!(!matches(".#", "a"));
    }

    #[test]
    fn a_hostile_pattern_is_cheap() {
        let evil = format!("{}x", "#.".repeat(20_000));
        let topic = "a.".repeat(100) + "b";
        let started = std::time::Instant::now();
        assert!(!matches(&evil, &topic), "too long to be a pattern");
        assert!(validate_subscription(&evil).is_err());
        let worst = "#.a.#.b.*.*.*.*.*.*.*.*.*.*.*.c";
        assert!(validate_subscription(worst).is_ok());
        for _ in 0..1000 {
            assert!(!matches(worst, &topic));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn subscriptions_are_bounded() {
        assert!(validate_subscription("orders.#").is_ok());
        assert!(validate_subscription("#.a.#").is_ok());
        let e = validate_subscription("#.a.#.b.#").unwrap_err();
        assert!(e.contains("3 `#`; at most 2"), "{e}");
        let long = vec!["a"; 17].join(".");
        assert!(validate_subscription(&long).unwrap_err().contains("16"));
        for bad in ["", "a..b", "a.b c", "a.\n", "a.#x", &"x".repeat(300)] {
            assert!(validate_subscription(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn coverage() {
        for (outer, inner) in [
            ("orders.#", "orders.#"),
            ("orders.#", "orders.created"),
            ("orders.#", "orders.*.eu"),
            ("orders.#", "orders"),
            ("orders.*", "orders.created"),
            ("#", "anything.#"),
            ("a.#.z", "a.b.#.z"),
        ] {
            assert!(covers(outer, inner), "{outer} covers {inner}");
        }
        for (outer, inner) in [
            ("orders.#", "#"),
            ("orders.#", "*.*"),
            ("orders.#", "secret.stuff"),
            ("orders.#", "nuropb.#"),
            ("orders.*", "orders.#"),
            ("orders.*", "orders"),
            ("orders.created", "orders.*"),
            ("a", "a.#"),
        ] {
            assert!(!covers(outer, inner), "{outer} does not cover {inner}");
        }
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_owned)
    }

    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("*"), Just("#")].prop_map(str::to_owned)
    }

    fn join(words: Vec<String>) -> String {
        words.join(".")
    }

    proptest! {
        #[test]
        fn matches_agrees_with_the_reference(
            p in prop::collection::vec(pattern_word(), 1..8).prop_map(join),
            t in prop::collection::vec(word(), 1..8).prop_map(join),
        ) {
            prop_assert_eq!(matches(&p, &t), reference(&p, &t), "{} / {}", p, t);
        }

        /// Words may be empty here (no valid pattern or topic has one),
        /// and patterns long: the byte comparison of literal patterns and
        /// `prefix.#` must agree with the automaton on any input.
        #[test]
        fn literal_shapes_match_as_the_automaton_does(
            head in prop::collection::vec(prop_oneof![Just(""), Just("a"), Just("b")], 1..40)
                .prop_map(|w| w.join(".")),
            tail in prop_oneof![Just(""), Just(".#"), Just(".*"), Just("#")],
            t in prop::collection::vec(prop_oneof![Just(""), Just("a"), Just("b")], 1..40)
                .prop_map(|w| w.join(".")),
        ) {
            let p = format!("{head}{tail}");
            prop_assert_eq!(matches(&p, &t), matches_any_pattern(&p, &t), "{} / {}", p, t);
            if p.split('.').count() <= 10 && t.split('.').count() <= 10 {
                prop_assert_eq!(matches(&p, &t), reference(&p, &t), "{} / {}", p, t);
            }
        }

        #[test]
        fn coverage_never_widens(
            outer in prop::collection::vec(pattern_word(), 1..6).prop_map(join),
            inner in prop::collection::vec(pattern_word(), 1..6).prop_map(join),
            topics in prop::collection::vec(prop::collection::vec(word(), 1..7).prop_map(join), 1..20),
        ) {
            if covers(&outer, &inner) {
                for t in &topics {
                    if reference(&inner, t) {
                        prop_assert!(reference(&outer, t), "{} covers {} but not {}", outer, inner, t);
                    }
                }
            }
        }

        #[test]
        fn a_pattern_covers_itself(
            p in prop::collection::vec(pattern_word(), 1..8).prop_map(join),
        ) {
            prop_assert!(covers(&p, &p));
        }
    }
}
