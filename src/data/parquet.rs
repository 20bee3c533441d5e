//! Parquet inputs of `data prepare`: one document per row, the string column the caller names
//! (`--text-key`, "text" by default), read a row group at a time with only that column
//! decoded. Pages plain or compressed with Snappy (pyarrow's and the datasets library's
//! default), gzip, zstd or LZ4; another codec (Brotli, LZO) is an error naming the file.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::Type;

/// The rows of one Parquet file, the text column of each in turn.
pub struct ParquetTexts {
    path: std::path::PathBuf,
    rows: RowIter<'static>,
    /// Rows read so far (the 1-based number of the last one).
    row: u64,
    pub total_rows: u64,
}

impl ParquetTexts {
    /// Open `path` and check that it has a string column `key` (an error lists the columns).
    pub fn open(path: &Path, key: &str) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("cannot read input file {}", path.display()))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| anyhow!("{} is not a readable Parquet file: {e}", path.display()))?;
        let meta = reader.metadata().file_metadata();
        let schema = meta.schema();
        let total_rows = meta.num_rows().max(0) as u64;
        let fields = schema.get_fields();
        let Some(column) = fields.iter().find(|f| f.name() == key) else {
            bail!(
                "{} has no column {key:?} (columns: {}); name the text column with --text-key",
                path.display(),
                fields
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if !column.is_primitive() {
            bail!(
                "{} column {key:?} is a nested column, not text",
                path.display()
            );
        }
        let projection = Type::group_type_builder(schema.name())
            .with_fields(vec![column.clone()])
            .build()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let rows = RowIter::from_file_into(Box::new(reader))
            .project(Some(projection))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            rows,
            row: 0,
            total_rows,
        })
    }

    /// The next row's text and its 1-based row number; None at the end. A null or non-string
    /// value is an error naming the file and row.
    pub fn next_text(&mut self) -> Result<Option<(String, u64)>> {
        let Some(row) = self.rows.next() else {
            return Ok(None);
        };
        self.row += 1;
        let row =
            row.map_err(|e| anyhow!("cannot read {} row {}: {e}", self.path.display(), self.row))?;
        match row.get_column_iter().next().map(|(_, f)| f) {
            Some(Field::Str(s)) => Ok(Some((s.clone(), self.row))),
            Some(Field::Bytes(b)) => match std::str::from_utf8(b.data()) {
                Ok(s) => Ok(Some((s.to_string(), self.row))),
                Err(_) => bail!(
                    "{} row {}: the text column holds bytes that are not UTF-8",
                    self.path.display(),
                    self.row
                ),
            },
            Some(Field::Null) | None => bail!(
                "{} row {}: the text column is null",
                self.path.display(),
                self.row
            ),
            Some(other) => bail!(
                "{} row {}: the text column holds {other}, not a string",
                self.path.display(),
                self.row
            ),
        }
    }
}
