//! The CLIP text encoder: OpenAI CLIP ViT-L/14's text tower for SD1, OpenCLIP ViT-H's for SD2.
//! Follows transformers' `CLIPTextModel` (models/clip/modeling_clip.py): pre-norm transformer layers
//! with causal self-attention, and the final layer norm applied to the last layer used.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, Linear};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{DType, Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::cpu_activation;
use super::cpu_pool;
use super::layers::{cast, layer_norm, layer_normalize, linear, multi_head_attention, project};

/// The MLP activation: SD1's CLIP uses quick GELU, OpenCLIP exact GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

/// `config.json` of a diffusers `text_encoder/` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn init(&self, device: &Device) -> ClipTextModel {
        let d = self.hidden_size;
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(d, d, true, device),
                    k_proj: linear(d, d, true, device),
                    v_proj: linear(d, d, true, device),
                    out_proj: linear(d, d, true, device),
                    heads: self.num_attention_heads,
                },
                layer_norm1: layer_norm(d, self.layer_norm_eps, device),
                mlp: ClipMlp {
                    fc1: linear(d, self.intermediate_size, true, device),
                    fc2: linear(self.intermediate_size, d, true, device),
                    activation: self.hidden_act,
                },
                layer_norm2: layer_norm(d, self.layer_norm_eps, device),
            })
            .collect();
        ClipTextModel {
            embeddings: ClipEmbeddings {
                token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d)
                    .init(device),
            },
            encoder: ClipEncoder { layers },
            final_layer_norm: layer_norm(d, self.layer_norm_eps, device),
        }
    }
}

#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub activation: ClipActivation,
}

impl ClipTextModel {
    /// The text embedding the UNet attends to: the hidden state after all layers but the last
    /// `skip_last`, through the final layer norm.
    ///
    /// # Shapes
    /// ids: [batch, tokens] → [batch, tokens, hidden]
    pub fn forward(&self, ids: Tensor<2, Int>, skip_last: usize) -> Tensor<3> {
        let device = ids.device();
        cpu_pool::awake(&device, || self.encode(ids, skip_last))
    }

    fn encode(&self, ids: Tensor<2, Int>, skip_last: usize) -> Tensor<3> {
        let [batch, tokens] = ids.dims();
        let positions = self.embeddings.position_embedding.weight.dims()[0];
        assert!(
            tokens <= positions,
            "{tokens} tokens exceed the encoder's {positions} positions"
        );
        let layers = &self.encoder.layers;
        assert!(skip_last < layers.len(), "cannot skip every CLIP layer");
        let position_ids = Tensor::<1, Int>::arange(0..tokens as i64, &ids.device())
            .unsqueeze::<2>()
            .expand([batch, tokens]);
        let mut x = self.embeddings.token_embedding.forward(ids)
            + self.embeddings.position_embedding.forward(position_ids);
        for layer in &layers[..layers.len() - skip_last] {
            x = layer.forward(x);
        }
        cast(layer_normalize(&self.final_layer_norm, x), DType::F32)
    }
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let attn = &self.self_attn;
        let h = layer_normalize(&self.layer_norm1, x.clone());
        let h = multi_head_attention(
            project(&attn.q_proj, h.clone(), None),
            project(&attn.k_proj, h.clone(), None),
            project(&attn.v_proj, h, None),
            attn.heads,
            true,
        );
        let x = project(&attn.out_proj, h, Some(x));
        let h = layer_normalize(&self.layer_norm2, x.clone());
        let mlp = &self.mlp;
        if cpu_activation::mlp_applies(&mlp.fc1, &mlp.fc2, &h) {
            return cpu_activation::mlp(&mlp.fc1, &mlp.fc2, mlp.activation, h, x);
        }
        let h = project(&mlp.fc1, h, None);
        let h = match self.mlp.activation {
            ClipActivation::QuickGelu => h.clone() * sigmoid(h.mul_scalar(1.702)),
            ClipActivation::Gelu => gelu(h),
        };
        project(&self.mlp.fc2, h, Some(x))
    }
}
