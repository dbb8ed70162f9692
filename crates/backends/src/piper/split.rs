//! A Piper (VITS) graph cut in two where its vocoder begins, so a sentence's audio can be made in
//! pieces: the first part (text encoder, duration predictor, flow) runs once per sentence and
//! gives the latent frames; the vocoder (HiFi-GAN, `/dec/...`) then runs on a few frames at a time
//! and the first of them can be sent while the rest are made. The vocoder is convolutional, so a
//! piece decoded with enough frames of context on each side is the same audio as the whole.
//!
//! The cut is made on the ONNX protobuf's wire format (no schema crate): the model's fields are
//! copied as they are, the graph's nodes and initializers are shared out between the two halves,
//! and the tensors crossing the cut (the latent, and a speaker embedding on multi-speaker voices)
//! become the first half's outputs and the second half's inputs. Anything unexpected (no
//! `/dec/conv_pre/Conv`, a control-flow node in the vocoder, the vocoder reading a graph input)
//! leaves the voice whole; the caller also checks the halves against the whole graph once.

use std::collections::{BTreeSet, HashMap, HashSet};

/// The node that starts a Piper vocoder as `torch.onnx.export` names it.
pub const VOCODER_FIRST_NODE: &str = "/dec/conv_pre/Conv";

/// The two halves of a voice's graph.
#[derive(Debug, Clone)]
pub struct SplitGraph {
    /// Text to latent: the original inputs; outputs `boundary`.
    pub encoder: Vec<u8>,
    /// Latent to audio: inputs `boundary`; the original outputs.
    pub decoder: Vec<u8>,
    /// The tensors crossing the cut, the latent (`[1, channels, frames]`) first.
    pub boundary: Vec<String>,
}

// Field numbers of onnx.proto.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_INPUT: u32 = 11;
const GRAPH_OUTPUT: u32 = 12;
const GRAPH_VALUE_INFO: u32 = 13;
const GRAPH_QUANTIZATION_ANNOTATION: u32 = 14;
const GRAPH_SPARSE_INITIALIZER: u32 = 15;
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_NAME: u32 = 3;
const NODE_OP_TYPE: u32 = 4;
const TENSOR_NAME: u32 = 8;
const VALUE_INFO_NAME: u32 = 1;
const VALUE_INFO_TYPE: u32 = 2;
const TYPE_TENSOR: u32 = 1;
const TENSOR_TYPE_ELEM_TYPE: u32 = 1;
/// `TensorProto.DataType.FLOAT`.
const FLOAT: u64 = 1;

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_I32: u8 = 5;

/// One field of a message: its number, and its bytes as they appear (key included) and its value
/// (a length-delimited field's content).
struct Field<'a> {
    number: u32,
    wire: u8,
    raw: &'a [u8],
    value: &'a [u8],
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = varint(buf, &mut pos)?;
        let (number, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let value_start;
        match wire {
            WIRE_VARINT => {
                value_start = pos;
                varint(buf, &mut pos)?;
            }
            WIRE_I64 | WIRE_I32 => {
                value_start = pos;
                pos += if wire == WIRE_I64 { 8 } else { 4 };
            }
            WIRE_LEN => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| "length overflows")?;
                value_start = pos;
                pos = pos.checked_add(len).ok_or("length overflows")?;
            }
            other => return Err(format!("unsupported wire type {other} (field {number})")),
        }
        if pos > buf.len() {
            return Err(format!("field {number} runs past the end of its message"));
        }
        out.push(Field { number, wire, raw: &buf[start..pos], value: &buf[value_start..pos] });
    }
    Ok(out)
}

fn strings(message: &[u8], number: u32) -> Result<Vec<String>, String> {
    Ok(fields(message)?
        .into_iter()
        .filter(|f| f.number == number && f.wire == WIRE_LEN)
        .map(|f| String::from_utf8_lossy(f.value).into_owned())
        .collect())
}

fn string(message: &[u8], number: u32) -> Result<String, String> {
    Ok(strings(message, number)?.pop().unwrap_or_default())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_len(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | u64::from(WIRE_LEN));
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// A `ValueInfoProto` for a float tensor of unknown shape.
fn float_value_info(name: &str) -> Vec<u8> {
    let mut tensor_type = Vec::new();
    put_varint(&mut tensor_type, (u64::from(TENSOR_TYPE_ELEM_TYPE) << 3) | u64::from(WIRE_VARINT));
    put_varint(&mut tensor_type, FLOAT);
    let mut type_proto = Vec::new();
    put_len(&mut type_proto, TYPE_TENSOR, &tensor_type);
    let mut info = Vec::new();
    put_len(&mut info, VALUE_INFO_NAME, name.as_bytes());
    put_len(&mut info, VALUE_INFO_TYPE, &type_proto);
    info
}

struct Node {
    inputs: Vec<String>,
    outputs: Vec<String>,
    name: String,
    op_type: String,
}

/// Cuts a Piper voice's graph before its vocoder; `Ok(None)` when the graph is not shaped as
/// expected (it is then run whole).
pub fn split_vits(model: &[u8]) -> Result<Option<SplitGraph>, String> {
    let model_fields = fields(model)?;
    let graph = model_fields
        .iter()
        .find(|f| f.number == MODEL_GRAPH && f.wire == WIRE_LEN)
        .ok_or("the model has no graph")?
        .value;
    let graph_fields = fields(graph)?;
    if graph_fields
        .iter()
        .any(|f| matches!(f.number, GRAPH_SPARSE_INITIALIZER | GRAPH_QUANTIZATION_ANNOTATION))
    {
        return Ok(None);
    }
    let nodes = graph_fields
        .iter()
        .filter(|f| f.number == GRAPH_NODE && f.wire == WIRE_LEN)
        .map(|f| {
            Ok(Node {
                inputs: strings(f.value, NODE_INPUT)?,
                outputs: strings(f.value, NODE_OUTPUT)?,
                name: string(f.value, NODE_NAME)?,
                op_type: string(f.value, NODE_OP_TYPE)?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let Some(first) = nodes.iter().find(|n| n.name == VOCODER_FIRST_NODE && n.op_type == "Conv") else {
        return Ok(None);
    };
    let Some(latent) = first.inputs.first().cloned() else {
        return Ok(None);
    };
    let graph_inputs: HashSet<String> = graph_fields
        .iter()
        .filter(|f| f.number == GRAPH_INPUT)
        .map(|f| string(f.value, VALUE_INFO_NAME))
        .collect::<Result<_, _>>()?;
    let graph_outputs: Vec<String> = graph_fields
        .iter()
        .filter(|f| f.number == GRAPH_OUTPUT)
        .map(|f| string(f.value, VALUE_INFO_NAME))
        .collect::<Result<_, _>>()?;
    let producer: HashMap<&str, usize> =
        nodes.iter().enumerate().flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i))).collect();
    let closure = |roots: &[String]| -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut stack: Vec<usize> = roots.iter().filter_map(|t| producer.get(t.as_str()).copied()).collect();
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                stack.extend(nodes[i].inputs.iter().filter_map(|t| producer.get(t.as_str()).copied()));
            }
        }
        seen
    };
    let for_latent = closure(std::slice::from_ref(&latent));
    let for_outputs = closure(&graph_outputs);
    let vocoder: BTreeSet<usize> = for_outputs.difference(&for_latent).copied().collect();
    if vocoder.is_empty()
        || vocoder.iter().any(|&i| matches!(nodes[i].op_type.as_str(), "If" | "Loop" | "Scan"))
    {
        return Ok(None);
    }
    // What the vocoder reads from outside itself: tensors made before the cut (the latent, a
    // speaker embedding); never a graph input.
    let mut boundary = vec![latent.clone()];
    for &i in &vocoder {
        for input in nodes[i].inputs.iter().filter(|t| !t.is_empty()) {
            if graph_inputs.contains(input) {
                return Ok(None);
            }
            match producer.get(input.as_str()) {
                Some(p) if !vocoder.contains(p) && !boundary.contains(input) => boundary.push(input.clone()),
                _ => {}
            }
        }
    }
    let vocoder_reads: HashSet<&str> =
        vocoder.iter().flat_map(|&i| nodes[i].inputs.iter().map(String::as_str)).collect();
    let encoder_reads: HashSet<&str> = (0..nodes.len())
        .filter(|i| !vocoder.contains(i))
        .flat_map(|i| nodes[i].inputs.iter().map(String::as_str))
        .collect();

    let model_without_graph: Vec<u8> =
        model_fields.iter().filter(|f| f.number != MODEL_GRAPH).flat_map(|f| f.raw.iter().copied()).collect();
    let assemble = |keep_node: &dyn Fn(usize) -> bool,
                    keep_initializer: &dyn Fn(&str) -> bool,
                    inputs: &[Vec<u8>],
                    outputs: &[Vec<u8>]|
     -> Result<Vec<u8>, String> {
        let mut graph_out = Vec::new();
        let mut node_index = 0;
        for field in &graph_fields {
            match field.number {
                GRAPH_NODE => {
                    if keep_node(node_index) {
                        graph_out.extend_from_slice(field.raw);
                    }
                    node_index += 1;
                }
                GRAPH_INITIALIZER => {
                    if keep_initializer(&string(field.value, TENSOR_NAME)?) {
                        graph_out.extend_from_slice(field.raw);
                    }
                }
                // Replaced below; shapes are inferred again by ONNX Runtime.
                GRAPH_INPUT | GRAPH_OUTPUT | GRAPH_VALUE_INFO => {}
                _ => graph_out.extend_from_slice(field.raw),
            }
        }
        for input in inputs {
            put_len(&mut graph_out, GRAPH_INPUT, input);
        }
        for output in outputs {
            put_len(&mut graph_out, GRAPH_OUTPUT, output);
        }
        let mut out = model_without_graph.clone();
        put_len(&mut out, MODEL_GRAPH, &graph_out);
        Ok(out)
    };
    let originals = |number: u32| -> Vec<Vec<u8>> {
        graph_fields.iter().filter(|f| f.number == number).map(|f| f.value.to_vec()).collect()
    };
    let crossing: Vec<Vec<u8>> = boundary.iter().map(|name| float_value_info(name)).collect();
    let encoder = assemble(
        &|i| !vocoder.contains(&i),
        &|name| encoder_reads.contains(name) || !vocoder_reads.contains(name),
        &originals(GRAPH_INPUT),
        &crossing,
    )?;
    let decoder = assemble(
        &|i| vocoder.contains(&i),
        &|name| vocoder_reads.contains(name),
        &crossing,
        &originals(GRAPH_OUTPUT),
    )?;
    Ok(Some(SplitGraph { encoder, decoder, boundary }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(inputs: &[&str], outputs: &[&str], name: &str, op: &str) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            put_len(&mut n, NODE_INPUT, i.as_bytes());
        }
        for o in outputs {
            put_len(&mut n, NODE_OUTPUT, o.as_bytes());
        }
        put_len(&mut n, NODE_NAME, name.as_bytes());
        put_len(&mut n, NODE_OP_TYPE, op.as_bytes());
        n
    }

    fn initializer(name: &str) -> Vec<u8> {
        let mut t = Vec::new();
        put_len(&mut t, TENSOR_NAME, name.as_bytes());
        t
    }

    /// x → A → z → conv_pre(w) → B → y, with a speaker embedding s → E → g read by A and B, as a
    /// multi-speaker VITS conditions both its flow and its vocoder on the speaker.
    fn toy(vocoder_reads_input: bool) -> Vec<u8> {
        let mut graph = Vec::new();
        put_len(&mut graph, GRAPH_NODE, &node(&["s"], &["g"], "/emb_g/E", "Gather"));
        put_len(&mut graph, GRAPH_NODE, &node(&["x", "wa", "g"], &["z"], "/enc/A", "MatMul"));
        put_len(&mut graph, GRAPH_NODE, &node(&["z", "w"], &["c"], VOCODER_FIRST_NODE, "Conv"));
        let b_inputs: &[&str] = if vocoder_reads_input { &["c", "g", "x"] } else { &["c", "g"] };
        put_len(&mut graph, GRAPH_NODE, &node(b_inputs, &["y"], "/dec/B", "Add"));
        for name in ["wa", "w", "unused"] {
            put_len(&mut graph, GRAPH_INITIALIZER, &initializer(name));
        }
        for name in ["x", "s"] {
            put_len(&mut graph, GRAPH_INPUT, &float_value_info(name));
        }
        put_len(&mut graph, GRAPH_OUTPUT, &float_value_info("y"));
        let mut model = Vec::new();
        put_varint(&mut model, 1 << 3); // ir_version
        put_varint(&mut model, 8);
        put_len(&mut model, MODEL_GRAPH, &graph);
        model
    }

    fn graph_of(model: &[u8]) -> Vec<u8> {
        fields(model).unwrap().into_iter().find(|f| f.number == MODEL_GRAPH).unwrap().value.to_vec()
    }

    fn names(graph: &[u8], number: u32, name_field: u32) -> Vec<String> {
        fields(graph)
            .unwrap()
            .into_iter()
            .filter(|f| f.number == number)
            .map(|f| string(f.value, name_field).unwrap())
            .collect()
    }

    #[test]
    fn cuts_before_the_vocoder_and_shares_out_nodes_and_weights() {
        let split = split_vits(&toy(false)).unwrap().unwrap();
        assert_eq!(split.boundary, ["z", "g"]);
        let (encoder, decoder) = (graph_of(&split.encoder), graph_of(&split.decoder));
        assert_eq!(names(&encoder, GRAPH_NODE, NODE_NAME), ["/emb_g/E", "/enc/A"]);
        assert_eq!(names(&decoder, GRAPH_NODE, NODE_NAME), [VOCODER_FIRST_NODE, "/dec/B"]);
        assert_eq!(names(&encoder, GRAPH_INITIALIZER, TENSOR_NAME), ["wa", "unused"]);
        assert_eq!(names(&decoder, GRAPH_INITIALIZER, TENSOR_NAME), ["w"]);
        assert_eq!(names(&encoder, GRAPH_INPUT, VALUE_INFO_NAME), ["x", "s"]);
        assert_eq!(names(&encoder, GRAPH_OUTPUT, VALUE_INFO_NAME), ["z", "g"]);
        assert_eq!(names(&decoder, GRAPH_INPUT, VALUE_INFO_NAME), ["z", "g"]);
        assert_eq!(names(&decoder, GRAPH_OUTPUT, VALUE_INFO_NAME), ["y"]);
        // The model's other fields travel unchanged.
        assert_eq!(&split.decoder[..2], &[8, 8]);
    }

    #[test]
    fn leaves_unexpected_graphs_whole() {
        assert!(split_vits(&toy(true)).unwrap().is_none(), "the vocoder reads a graph input");
        let mut graph = Vec::new();
        put_len(&mut graph, GRAPH_NODE, &node(&["x"], &["y"], "/dec/other", "Conv"));
        let mut model = Vec::new();
        put_len(&mut model, MODEL_GRAPH, &graph);
        assert!(split_vits(&model).unwrap().is_none(), "no conv_pre");
        assert!(split_vits(&[0x3a, 0x05, 0x01]).is_err(), "truncated");
    }
}
