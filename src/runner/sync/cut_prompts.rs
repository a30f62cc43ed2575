//! Answers to prompts the server cut to fit its context. Ollama does not refuse a prompt
//! longer than its context: it drops the beginning (the instructions, the first rows), answers
//! what is left, and reports the prompt tokens it kept — the same count, its context, whatever
//! the prompt held. Some servers report only the prompt tokens they did not take from their
//! cache (some Ollama versions), far fewer than the prompt too, but growing with it. An answer
//! far short of the count here is held back until the two can be told apart: its count
//! standing still while the prompts grow is a cut; following them is a partial count, and
//! such answers are good from then on.

/// An answer whose server counted fewer than this share of the prompt tokens counted here...
const SHORT_SHARE: f64 = 0.5;
/// ...out of at least this many (short prompts differ more between tokenizers) is short. The
/// count here is `o200k_base`'s unless the job names another, and open models' tokenizers
/// count more tokens than it, not fewer.
const LEAST_COUNTED: u64 = 512;
/// A server's count below this is no context a prompt was cut to (a prompt whose every token
/// came from the server's cache, counted apart): nothing is judged from it.
const LEAST_REPORTED: u64 = 256;
/// Two short answers whose counts here differ by at least this share of the larger...
const COUNTED_APART: f64 = 0.03;
/// ...and whose servers' counts lie within this share of each other were cut at the same
/// ceiling: the server's context.
const SAME_CEILING: f64 = 0.01;
/// Two short answers whose servers' counts differ by at least this share of the difference of
/// their counts here follow the prompts: a partial count.
const FOLLOWING: f64 = 0.3;
/// Short answers kept to compare the next with.
const KEPT: usize = 16;

/// What an answer's prompt-token count says of its prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Whole, as far as the count tells.
    Whole,
    /// Far shorter than counted, and not yet told apart from a cut: the answer is not used.
    Short,
    /// Cut at the server's context (`ceiling` tokens, its count): the answer is not used.
    Cut { ceiling: u64 },
}

/// Short answers seen in a run, and what they showed.
#[derive(Debug, Default)]
pub struct CutPrompts {
    /// `(counted here, the server's count)` of short answers not yet told apart.
    short: Vec<(u64, u64)>,
    /// The server counts part of a prompt only: short answers are good.
    partial: bool,
    /// The count at which the server cuts prompts: its context.
    ceiling: Option<u64>,
    /// The cut was told in the log.
    told: bool,
}

impl CutPrompts {
    /// Whether a cut is to be told now: the first time only.
    pub fn tell(&mut self) -> bool {
        !std::mem::replace(&mut self.told, true)
    }

    /// Judges an answer to a prompt of `counted` tokens here that the server reported
    /// `reported` prompt tokens for (0: it reported none).
    pub fn judge(&mut self, counted: u64, reported: u64) -> Prompt {
        // A count of a few tokens is a prompt served from the server's cache, not a context.
        if reported < LEAST_REPORTED || counted < LEAST_COUNTED {
            return Prompt::Whole;
        }
        if let Some(ceiling) = self.ceiling
            && reported as f64 >= (1.0 - SAME_CEILING) * ceiling as f64
        {
            // A prompt the server counts at its whole context leaves no room for an answer.
            return Prompt::Cut { ceiling };
        }
        // A count standing at a short answer's count for a prompt of another size is the
        // ceiling, whether this prompt looks short or not (one between one and two contexts
        // long does not).
        if !self.partial {
            for &(other_counted, other_reported) in &self.short {
                let counted_apart = counted.abs_diff(other_counted) as f64;
                let reported_apart = reported.abs_diff(other_reported) as f64;
                if counted_apart >= COUNTED_APART * counted.max(other_counted) as f64
                    && reported_apart <= SAME_CEILING * reported.max(other_reported) as f64
                {
                    let ceiling = reported.max(other_reported);
                    self.ceiling = Some(ceiling);
                    self.short.clear();
                    return Prompt::Cut { ceiling };
                }
            }
        }
        if reported as f64 >= SHORT_SHARE * counted as f64 || self.partial {
            return Prompt::Whole;
        }
        for &(other_counted, other_reported) in &self.short {
            let counted_apart = counted.abs_diff(other_counted) as f64;
            let reported_apart = reported.abs_diff(other_reported) as f64;
            let grew_with = (counted > other_counted) == (reported > other_reported);
            if counted_apart > 0.0 && grew_with && reported_apart >= FOLLOWING * counted_apart {
                self.partial = true;
                self.short.clear();
                return Prompt::Whole;
            }
        }
        if self.short.len() == KEPT {
            self.short.remove(0);
        }
        self.short.push((counted, reported));
        Prompt::Short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_standing_still_while_prompts_grow_is_a_cut_at_the_servers_context() {
        let mut cut = CutPrompts::default();
        assert_eq!(cut.judge(6_000, 2_048), Prompt::Short);
        // The same request again: nothing more is known.
        assert_eq!(cut.judge(6_000, 2_048), Prompt::Short);
        // A prompt counted here at once to twice the context reports the same count: cut.
        let mut between = CutPrompts::default();
        assert_eq!(between.judge(6_000, 2_048), Prompt::Short);
        assert_eq!(between.judge(3_000, 2_048), Prompt::Cut { ceiling: 2_048 });
        assert_eq!(cut.judge(5_200, 2_048), Prompt::Cut { ceiling: 2_048 });
        // From then on, any prompt counted at the ceiling was cut, however long it is here...
        assert_eq!(cut.judge(2_100, 2_048), Prompt::Cut { ceiling: 2_048 });
        // ...and a shorter one is whole.
        assert_eq!(cut.judge(1_500, 1_700), Prompt::Whole);
        assert_eq!(cut.judge(3_500, 1_900), Prompt::Whole);
    }

    #[test]
    fn a_count_following_the_prompts_is_a_partial_count_and_such_answers_are_good() {
        // 1,500 tokens of instructions from the server's cache, the items' tokens counted.
        let mut partial = CutPrompts::default();
        assert_eq!(partial.judge(2_100, 620), Prompt::Short);
        assert_eq!(partial.judge(2_180, 700), Prompt::Whole);
        assert_eq!(partial.judge(4_000, 900), Prompt::Whole);
        // Whole prompts, short ones, no count: nothing held back.
        let mut fresh = CutPrompts::default();
        assert_eq!(fresh.judge(2_000, 2_300), Prompt::Whole);
        assert_eq!(fresh.judge(2_000, 1_100), Prompt::Whole);
        assert_eq!(fresh.judge(400, 100), Prompt::Whole);
        assert_eq!(fresh.judge(6_000, 0), Prompt::Whole);
        assert_eq!(fresh.short.len(), 0);
        // Prompts served from the cache, counted at a token or two: no ceiling learned.
        assert_eq!(fresh.judge(2_000, 1), Prompt::Whole);
        assert_eq!(fresh.judge(3_000, 1), Prompt::Whole);
        assert_eq!(fresh.ceiling, None);
    }
}
