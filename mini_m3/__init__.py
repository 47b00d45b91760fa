"""mini_m3: a compact, readable PyTorch reproduction of Memory³ (arXiv 2407.01178).

Data flows one way: text -> Tokenizer -> encode_references -> ExplicitMemory -> MemoryBank -> Retriever
-> Memory3 (Eq. 4 attention) -> generate.
"""

from .config import Memory3Config
from .inference import GenerationResult, generate, generate_batch
from .memory.bank import MemoryBank
from .memory.encode import ExplicitMemory, encode_references
from .memory.quantize import VectorQuantizer
from .memory.overlap import overlap
from .memory.retrieve import Retriever
from .model import KVCache, Memory3, MemoryKV, ModelOutput
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["Memory3Config", "Memory3", "MemoryKV", "KVCache", "ModelOutput", "Tokenizer", "ExplicitMemory",
           "encode_references", "VectorQuantizer", "MemoryBank", "Retriever", "overlap", "generate",
           "generate_batch", "GenerationResult"]
