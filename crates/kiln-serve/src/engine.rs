//! What the scheduler runs: a model with KV-cache slots, one sequence per slot, and
//! a forward pass over rows of several slots at once.

use kiln_core::{Backend, Error, Result};
use kiln_models::Model;

pub use kiln_models::BatchRow;

/// A model with `slots()` KV-cache slots, each holding one sequence.
pub trait Engine {
    /// Number of slots.
    fn slots(&self) -> usize;
    /// Positions each slot holds.
    fn capacity(&self) -> usize;
    /// Logits per row.
    fn vocab(&self) -> usize;
    /// Positions filled in `slot` (0 for a slot that does not exist).
    fn slot_len(&self, slot: usize) -> usize;
    /// Empties `slot`, so that its next row runs at position 0.
    fn clear_slot(&mut self, slot: usize);
    /// Runs every row at its slot's next position and returns the logits of the rows
    /// with `logits: true`, in row order, [`Engine::vocab`] values each. Errors and
    /// changes nothing on a slot that does not exist, a slot that would overflow its
    /// capacity, or an empty batch.
    fn forward_batch(&mut self, rows: &[BatchRow]) -> Result<Vec<f32>>;
    /// Runs `rows` as [`Engine::forward_batch`] does and returns the greedy token of
    /// each row with `logits: true`, in row order: the argmax of the logits
    /// [`Engine::forward_batch`] would return for it, lowest index on ties
    /// ([`kiln_models::sampler::argmax`]). Errors as [`Engine::forward_batch`] does.
    fn forward_batch_greedy(&mut self, rows: &[BatchRow]) -> Result<Vec<u32>>;
}

impl<E: Engine + ?Sized> Engine for Box<E> {
    fn slots(&self) -> usize {
        (**self).slots()
    }

    fn capacity(&self) -> usize {
        (**self).capacity()
    }

    fn vocab(&self) -> usize {
        (**self).vocab()
    }

    fn slot_len(&self, slot: usize) -> usize {
        (**self).slot_len(slot)
    }

    fn clear_slot(&mut self, slot: usize) {
        (**self).clear_slot(slot)
    }

    fn forward_batch(&mut self, rows: &[BatchRow]) -> Result<Vec<f32>> {
        (**self).forward_batch(rows)
    }

    fn forward_batch_greedy(&mut self, rows: &[BatchRow]) -> Result<Vec<u32>> {
        (**self).forward_batch_greedy(rows)
    }
}

/// A [`Model`] as an [`Engine`]: its KV-cache slots ([`kiln_models::LoadOptions::slots`])
/// and its batched forward pass ([`Model::forward_batch`]), whose greedy tokens it
/// chooses on the model's backend ([`Model::forward_batch_greedy`]: only their ids
/// are downloaded).
pub struct ModelEngine<BE: Backend> {
    model: Model<BE>,
}

impl<BE: Backend> ModelEngine<BE> {
    /// The engine over `model`, whose slots it empties.
    pub fn new(mut model: Model<BE>) -> Self {
        for slot in 0..model.slots() {
            model.clear_slot(slot);
        }
        ModelEngine { model }
    }
}

impl<BE: Backend> Engine for ModelEngine<BE> {
    fn slots(&self) -> usize {
        self.model.slots()
    }

    fn capacity(&self) -> usize {
        self.model.capacity()
    }

    fn vocab(&self) -> usize {
        self.model.config().vocab
    }

    fn slot_len(&self, slot: usize) -> usize {
        self.model.slot_len(slot)
    }

    fn clear_slot(&mut self, slot: usize) {
        self.model.clear_slot(slot)
    }

    fn forward_batch(&mut self, rows: &[BatchRow]) -> Result<Vec<f32>> {
        self.model.forward_batch(rows)
    }

    fn forward_batch_greedy(&mut self, rows: &[BatchRow]) -> Result<Vec<u32>> {
        self.model.forward_batch_greedy(rows)
    }
}

/// Checks `rows` against `engine`'s slots and capacity: not empty, every slot in
/// range, no slot past its capacity after the rows.
pub fn check_rows<E: Engine + ?Sized>(engine: &E, rows: &[BatchRow]) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::invalid("forward_batch", "the batch has no rows"));
    }
    let mut added = vec![0usize; engine.slots()];
    for row in rows {
        let n = added.get_mut(row.slot).ok_or_else(|| {
            Error::invalid(
                "forward_batch",
                format!(
                    "slot {} does not exist; there are {}",
                    row.slot,
                    engine.slots()
                ),
            )
        })?;
        *n += 1;
    }
    for (slot, n) in added.into_iter().enumerate() {
        let len = engine.slot_len(slot);
        if len + n > engine.capacity() {
            return Err(Error::invalid(
                "forward_batch",
                format!(
                    "slot {slot} holds {len} positions; {n} more pass its capacity {}",
                    engine.capacity()
                ),
            ));
        }
    }
    Ok(())
}
