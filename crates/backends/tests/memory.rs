//! The batch memory estimate against what a forward pass really allocates, counted by this test
//! binary's global allocator. The scheduler budgets batches with the estimate, so it must not be
//! below the real peak, and it must not be so far above it that batches are needlessly small.
//! One test function only: other tests running beside it would allocate into the same counters.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hearth_backends::bert::{BertEncoder, PaddedBatch};
use hearth_backends::Architecture;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::SeqCst) + size;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        grew(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const INTERMEDIATE: usize = 1024;
const LAYERS: usize = 2;
const VOCAB: usize = 1000;
const POSITIONS: usize = 512;

/// A random-weight BERT encoder of the sizes above, in the checkpoint's tensor names.
fn encoder(dtype: DType) -> BertEncoder {
    let device = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.05, shape, &device).unwrap();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("embeddings.word_embeddings.weight".to_string(), randn(&[VOCAB, HIDDEN]));
    tensors.insert("embeddings.position_embeddings.weight".to_string(), randn(&[POSITIONS, HIDDEN]));
    tensors.insert("embeddings.token_type_embeddings.weight".to_string(), randn(&[2, HIDDEN]));
    let mut layer_norms = vec!["embeddings.LayerNorm".to_string()];
    let mut linears = Vec::new();
    for i in 0..LAYERS {
        let l = format!("encoder.layer.{i}");
        for part in ["query", "key", "value"] {
            linears.push((format!("{l}.attention.self.{part}"), HIDDEN, HIDDEN));
        }
        linears.push((format!("{l}.attention.output.dense"), HIDDEN, HIDDEN));
        linears.push((format!("{l}.intermediate.dense"), INTERMEDIATE, HIDDEN));
        linears.push((format!("{l}.output.dense"), HIDDEN, INTERMEDIATE));
        layer_norms.push(format!("{l}.attention.output.LayerNorm"));
        layer_norms.push(format!("{l}.output.LayerNorm"));
    }
    for name in layer_norms {
        tensors.insert(format!("{name}.weight"), Tensor::ones(HIDDEN, DType::F32, &device).unwrap());
        tensors.insert(format!("{name}.bias"), Tensor::zeros(HIDDEN, DType::F32, &device).unwrap());
    }
    for (name, out_dim, in_dim) in linears {
        tensors.insert(format!("{name}.weight"), randn(&[out_dim, in_dim]));
        tensors.insert(format!("{name}.bias"), randn(&[out_dim]));
    }
    let config = serde_json::from_value(serde_json::json!({
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE, "max_position_embeddings": POSITIONS, "vocab_size": VOCAB,
    }))
    .unwrap();
    let vb = VarBuilder::from_tensors(tensors, dtype, &device);
    BertEncoder::load(vb, &config, Architecture::Bert, 0).unwrap()
}

fn batch(n: usize, longest: usize) -> PaddedBatch {
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..n)
        .map(|r| {
            let len = longest - r % 3; // a little padding in most rows
            ((0..len).map(|i| ((i * 7 + r) % VOCAB) as u32).collect(), vec![0; len])
        })
        .collect();
    PaddedBatch::new(rows.iter().map(|(ids, types)| (ids.as_slice(), types.as_slice())), 0)
}

/// Peak bytes allocated above the level before the forward pass (its output included).
fn measured_peak(encoder: &BertEncoder, batch: &PaddedBatch) -> usize {
    let baseline = CURRENT.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let states = encoder.forward(batch).unwrap();
    let peak = PEAK.load(Ordering::SeqCst);
    drop(states);
    peak - baseline
}

#[test]
fn the_estimate_bounds_the_real_peak_without_wasting_the_budget() {
    let whole = encoder(DType::F32);
    let blockwise = encoder(DType::F32).with_attention_block_bytes(256 << 10);
    let half = encoder(DType::F16);
    // Warm up: the first passes allocate the thread pool and gemm's scratch buffers once.
    whole.forward(&batch(2, 16)).unwrap();
    half.forward(&batch(2, 16)).unwrap();
    for (encoder, n, longest, what) in [
        (&whole, 8, 128, "f32, one attention block"),
        (&whole, 2, 512, "f32, long rows, one block"),
        (&blockwise, 8, 128, "f32, 8 attention blocks"),
        (&blockwise, 2, 512, "f32, 32 attention blocks"),
        (&half, 8, 128, "f16, one attention block"),
        (&half, 2, 512, "f16, long rows, one block"),
    ] {
        let batch = batch(n, longest);
        let measured = measured_peak(encoder, &batch);
        let estimated = encoder.activation_bytes(n, longest);
        eprintln!("{what}: measured {measured} estimated {estimated}");
        assert!(estimated >= measured, "{what}: estimate {estimated} below the real peak {measured}");
        assert!(
            estimated <= 2 * measured,
            "{what}: estimate {estimated} over twice the real peak {measured}"
        );
    }
    // Blocks bound attention memory: the quadratic part no longer grows with the whole row.
    let long = batch(2, 512);
    assert!(measured_peak(&blockwise, &long) < measured_peak(&whole, &long));
}
