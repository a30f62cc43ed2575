//! The trial's sample: `n` pending rows drawn with a seed, spread over input lengths — one row
//! from each of `n` equal slices of the rows ordered by length — so short and long inputs are
//! both tried, not only the first rows of the table.

use futures_util::StreamExt;

use crate::store::{Item, Store, Tables};

/// The pending rows' count and a sample of `n` of them, read in two passes over the pending
/// rows (their lengths, then the rows drawn), so memory holds a length per row, never the rows.
pub async fn sample_pending(store: &dyn Store, tables: &Tables, n: usize, seed: u64) -> anyhow::Result<(u64, Vec<Item>)> {
    let mut lengths = Vec::new();
    let mut rows = store.pending_rows(tables, None);
    while let Some(row) = rows.next().await {
        lengths.push(row?.to_json_line().len());
    }
    drop(rows);
    let chosen = choose(&lengths, n, seed);
    let mut sample = Vec::with_capacity(chosen.len());
    let mut wanted = chosen.iter().copied().peekable();
    let mut rows = store.pending_rows(tables, None);
    let mut index = 0;
    while let Some(&next) = wanted.peek() {
        let Some(row) = rows.next().await else { break };
        let row = row?;
        if index == next {
            sample.push(row);
            wanted.next();
        }
        index += 1;
    }
    Ok((lengths.len() as u64, sample))
}

/// The indices (ascending) of `n` rows of the given lengths: one at random from each of `n`
/// slices of the rows sorted by length; all of them when there are fewer.
fn choose(lengths: &[usize], n: usize, seed: u64) -> Vec<usize> {
    if lengths.len() <= n {
        return (0..lengths.len()).collect();
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut by_length: Vec<(usize, usize)> = lengths.iter().enumerate().map(|(i, length)| (*length, i)).collect();
    by_length.sort_unstable();
    let mut chosen: Vec<usize> = (0..n)
        .map(|slice| {
            let (start, end) = (slice * lengths.len() / n, (slice + 1) * lengths.len() / n);
            by_length[rng.usize(start..end)].1
        })
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Draws `n` rows of `rows` (all of them when there are fewer), one at random from each of `n`
/// slices of the rows sorted by input length. The same rows and seed give the same sample; it
/// keeps the rows' own order.
#[cfg(test)]
fn spread(rows: &[Item], n: usize, seed: u64) -> Vec<Item> {
    let lengths: Vec<usize> = rows.iter().map(|row| row.to_json_line().len()).collect();
    choose(&lengths, n, seed).into_iter().map(|i| rows[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rows(n: usize) -> Vec<Item> {
        // Lengths grow with the id, so the sample's lengths show how it spreads.
        (0..n).map(|i| Item { id: i.to_string(), fields: vec![("text".into(), json!("x".repeat(i)))] }).collect()
    }

    #[test]
    fn the_sample_spans_short_and_long_inputs_and_repeats_with_its_seed() {
        let all = rows(1000);
        let sample = spread(&all, 20, 7);
        assert_eq!(sample.len(), 20);
        let ids: Vec<usize> = sample.iter().map(|r| r.id.parse().unwrap()).collect();
        assert!(ids[0] < 50 && ids[19] >= 950, "{ids:?}");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "kept in the rows' order, no row twice: {ids:?}");
        assert_eq!(spread(&all, 20, 7), sample);
        assert_ne!(spread(&all, 20, 8), sample);
    }

    #[test]
    fn fewer_rows_than_asked_are_all_taken() {
        assert_eq!(spread(&rows(5), 20, 1).len(), 5);
    }
}
